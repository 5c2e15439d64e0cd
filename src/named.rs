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
/// and config files say) and `FromStr` by [`parse_name`], whose errors call the set `$kind`.
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
    };
}
pub(crate) use choices;
