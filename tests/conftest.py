"""The order `make test` runs the files in: the longest first.

`make test` runs two xdist workers, one file each at a time (`--dist loadfile`), so the run
ends when the worker with the larger share ends. xdist's own order (files with more tests
first, `--loadscope-reorder`) put the ~14-minute test_e2e_wilds_methods.py (two tests) last,
alone on one core for its whole length; the Makefile turns that order off
(`--no-loadscope-reorder`) and this hook sorts the collection longest first (the longest-
processing-time rule), each file's tests kept in their order and together (module fixtures).

FILE_SECONDS: each file's setup + call + teardown in a clean clone's `.ci/run` of 2026-12-07
(`--durations=0`, two workers on two cores, ~6,500 s in all). A guide to the order only: a
file left out or grown since runs in collection order after these; nothing else depends on
the figures.
"""

from __future__ import annotations

FILE_SECONDS = {
    "tests/test_e2e.py": 1068,
    "tests/test_finetune_rxrx1.py": 998,
    "tests/test_e2e_wilds_methods.py": 834,
    "tests/test_e2e_search.py": 466,
    "tests/test_cluster_e2e.py": 422,
    "tests/test_e2e_seeds.py": 388,
    "tests/test_e2e_custom.py": 313,
    "tests/test_cluster.py": 305,
    "tests/test_pretrain.py": 239,
    "tests/test_study.py": 225,
    "tests/test_cluster_slurm.py": 186,
    "tests/test_e2e_tracking_server.py": 155,
    "tests/test_tracking_server.py": 110,
}


def pytest_collection_modifyitems(session, config, items):
    # a stable sort: the files not listed, and each file's tests, keep the collection order
    items.sort(key=lambda item: -FILE_SECONDS.get(item.nodeid.split("::")[0], 0))
