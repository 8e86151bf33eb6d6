"""Path composition (DiPaCo): a model of shared modules, each site training only the paths
its data routes to (:mod:`atoll.paths.grid`, :mod:`atoll.paths.aggregate`)."""
