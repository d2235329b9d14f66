//! String-valued configuration knobs with a fixed set of names (`[node] record`,
//! `[node] frontend`, `[volume] mode`): one table of names per knob, from which the parsing
//! (whose error lists the valid names) and the display follow.

/// The value named `s` in `table`, or `unknown <what> '<s>' (<the names>)`.
pub fn parse<T: Copy>(what: &str, s: &str, table: &[(T, &str)]) -> Result<T, String> {
    match table.iter().find(|(_, name)| *name == s) {
        Some(&(value, _)) => Ok(value),
        None => Err(format!("unknown {what} '{s}' ({})", names(table))),
    }
}

/// The names of `table`, in order: `a, b, c`.
pub fn names<T>(table: &[(T, &str)]) -> String {
    table.iter().map(|(_, name)| *name).collect::<Vec<_>>().join(", ")
}

/// Declares a fieldless enum together with the configuration name of each variant, and
/// derives from that one table `FromStr` (an error names the knob and lists the names, in
/// order: `unknown <what> 'x' (a, b, c)`), `Display` (the name) and `NAMES` (the table).
///
/// ```ignore
/// choice! {
///     /// `[node] colour`.
///     #[derive(Clone, Copy, Debug, PartialEq, Eq)]
///     pub enum Colour: "colour" {
///         /// Doc comments and attributes (`#[default]`) stay on the variants.
///         Red = "red",
///         Blue = "blue",
///     }
/// }
/// ```
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $what:literal {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $text:literal
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $(
                $(#[$vmeta])*
                $variant,
            )+
        }

        impl $name {
            /// Every value with its configuration name, in the order the error lists them.
            pub const NAMES: &'static [($name, &'static str)] = &[$(($name::$variant, $text)),+];
        }

        impl ::std::str::FromStr for $name {
            type Err = ::std::string::String;
            fn from_str(s: &str) -> ::std::result::Result<Self, ::std::string::String> {
                $crate::choice::parse($what, s, Self::NAMES)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(match self {
                    $($name::$variant => $text,)+
                })
            }
        }
    };
}
pub(crate) use choice;

#[cfg(test)]
mod tests {
    use super::*;

    choice! {
        /// A knob for the tests.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        enum Colour: "colour" {
            Red = "red",
            /// The default one.
            #[default]
            Blue = "blue",
            DarkGreen = "dark-green",
        }
    }

    #[test]
    fn every_name_round_trips_and_an_unknown_one_lists_them_all() {
        for &(value, name) in Colour::NAMES {
            assert_eq!(name.parse::<Colour>(), Ok(value));
            assert_eq!(value.to_string(), name);
        }
        assert_eq!(Colour::default(), Colour::Blue);
        assert_eq!("Red".parse::<Colour>(), Err("unknown colour 'Red' (red, blue, dark-green)".to_owned()));
        assert_eq!(parse("mode", "x", &[(1, "a")]), Err::<i32, _>("unknown mode 'x' (a)".to_owned()));
        assert_eq!(names(&[(1, "a"), (2, "b")]), "a, b");
    }
}
