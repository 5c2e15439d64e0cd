//! The closed sets of choices that flags and config files name (recipes, stems, models,
//! test-time augmentations): one parser, one error message.

/// The member of `all` whose `name` is `s`; the error names the `kind` and lists every choice.
pub fn parse_name<T: Copy>(kind: &str, all: &[T], name: fn(T) -> &'static str, s: &str) -> Result<T, String> {
    all.iter().copied().find(|&v| name(v) == s).ok_or_else(|| {
        let names: Vec<_> = all.iter().map(|&v| name(v)).collect();
        format!("unknown {kind} '{s}' (expected one of: {})", names.join(", "))
    })
}
