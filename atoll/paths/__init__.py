"""Path composition (DiPaCo): a model of shared modules, each site training only the paths
its data routes to.

- :mod:`atoll.paths.grid`: levels of modules, paths, the grid's weights;
- :mod:`atoll.paths.aggregate`: each module's mean over the paths through it;
- :mod:`atoll.paths.router`: row features and product k-means;
- :mod:`atoll.paths.site_rows`: a site's feature sample and its rows per path (consent kept);
- :mod:`atoll.paths.planning`: which path each site trains in a round;
- :mod:`atoll.app.paths_export`: every path as a Hugging Face model, and a prompt's path.
"""
