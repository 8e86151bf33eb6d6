"""Path composition (DiPaCo): a model of shared modules, each site training only the paths
its data routes to.

- :mod:`atoll.paths.grid`: levels of modules, paths, the grid's weights;
- :mod:`atoll.paths.aggregate`: each module's mean over the paths through it;
- :mod:`atoll.paths.router` (settings in :mod:`atoll.paths.router_config`): row features,
  flat and product k-means;
- :mod:`atoll.paths.site_rows`: a site's feature sample and its rows per path (consent kept);
- :mod:`atoll.paths.planning`: which path each site trains in a round;
- :mod:`atoll.paths.assignment`: the coordinator's view of a grid (router, tokens per path).

The round loop uses them from :mod:`atoll.federation` (features, a site's per-path states,
the coordinator's per-module means) and :mod:`atoll.app.grid_run` (fitting the router,
routed validation, export: :mod:`atoll.app.paths_export`).
"""
