//! torchvision's ResNet-18 state_dict names, mapped onto ours (`--stem torchvision`), so that
//! torchvision's weights (ImageNet-pretrained ones too) load, evaluate and fine-tune here.
//!
//! torchvision: `conv1`, `bn1`, `layerS.B.{conv1,bn1,conv2,bn2}`, `layerS.B.downsample.{0,1}`,
//! `fc`. Ours (the seed's): `conv1.0`, `conv1.1`, `conv{S+1}.B.layer.{0,1,3,4}`,
//! `conv{S+1}.B.shortcut.{0,1}`, `fc`. The layers are the same: torchvision's stem is the
//! seed's with a ReLU after the BatchNorm.

/// True when `names` are torchvision's ResNet names rather than ours.
pub fn is_torchvision<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n.starts_with("layer1.0.conv1."))
}

/// Our name for torchvision's `name`, or `None` when it is not a ResNet-18 name.
pub fn to_seed_name(name: &str) -> Option<String> {
    let (module, leaf) = name.rsplit_once('.')?;
    let parts: Vec<&str> = module.split('.').collect();
    let ours = match parts.as_slice() {
        ["conv1"] => "conv1.0".to_string(),
        ["bn1"] => "conv1.1".to_string(),
        ["fc"] => "fc".to_string(),
        [layer, block, rest @ ..] if layer.starts_with("layer") => {
            let stage: usize = layer["layer".len()..].parse().ok()?;
            let inner = match rest {
                ["conv1"] => "layer.0".to_string(),
                ["bn1"] => "layer.1".to_string(),
                ["conv2"] => "layer.3".to_string(),
                ["bn2"] => "layer.4".to_string(),
                ["downsample", i @ ("0" | "1")] => format!("shortcut.{i}"),
                _ => return None,
            };
            format!("conv{}.{block}.{inner}", stage + 1)
        }
        _ => return None,
    };
    Some(format!("{ours}.{leaf}"))
}
