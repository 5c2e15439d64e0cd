//! The closed sets of choices that flags and config files name (recipes, stems, models,
//! test-time augmentations, GPU precisions): one declaration, one parser, one error message.

/// The member of `all` whose `name` is `s`; the error names the `kind` and lists every choice.
pub fn parse_name<T: Copy>(kind: &str, all: &[T], name: fn(T) -> &'static str, s: &str) -> Result<T, String> {
    all.iter().copied().find(|&v| name(v) == s).ok_or_else(|| {
        let names: Vec<_> = all.iter().map(|&v| name(v)).collect();
        format!("unknown {kind} '{s}' (expected one of: {})", names.join(", "))
    })
}

/// Names a closed set of choices: `ALL` (every member, in help order), `name()` (what flags
/// and config files say), `FromStr` by [`parse_name`], whose errors call the set `$kind`, and
/// serde as the same names (run configs, TOML files and checkpoint metadata say what flags say).
macro_rules! choices {
    ($ty:ident, $kind:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: [$ty; { [$(stringify!($variant)),+].len() }] = [$($ty::$variant),+];

            /// The name flags and config files give this choice.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $crate::named::parse_name($kind, &$ty::ALL, $ty::name, s)
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use choices;
