"""The embedded toy prior's side of the engine: its trainer (:mod:`.trainer`), its analytic shapes and judge
(:mod:`.data`) and the quality harness (:mod:`.quality`). Beside the core, never under it: the core finds the
embedded prior's folder through :func:`asd_engine.prior.loading.default_prior_path`."""
