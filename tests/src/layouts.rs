//! Running one integration test on both ring layouts.

/// Declares tests that run on split and packed rings: for each body `fn name(ring: &Setup)` in
/// scope, a module `name` with the tests `split` and `packed`, each handing the body the default
/// [`Setup`](crate::frontend::Setup) of its layout (so a failure names the behaviour and the
/// layout, and `cargo test packed` picks one layout).
#[macro_export]
macro_rules! on_both_layouts {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn split() -> anyhow::Result<()> {
                super::$name(&$crate::frontend::Setup::with_packed(false))
            }
            #[test]
            fn packed() -> anyhow::Result<()> {
                super::$name(&$crate::frontend::Setup::with_packed(true))
            }
        }
    )*};
}
