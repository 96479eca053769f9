"""Running a study on Ray Tune, the one package that imports Ray: the checks before a sweep
(`preflight`), the driver and the sweep folder's lifecycle (`driver`, `folder`), the trial as Ray
runs it (`trainable`), seed-aware scheduling (`seed_groups`, Ray-free, and `scheduling`), the
searcher (`search`), the callbacks that end runs and show progress (`callbacks`, `status`) and the
connection to a cluster (`cluster`)."""


def __getattr__(name: str):
    # Old pickles name classes of the module this package replaced: `study.sweep.SeedRepeater`.
    from study.legacy import sweep_attribute

    return sweep_attribute(name)
