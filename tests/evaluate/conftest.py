from conftest_ray import ray_cluster, tiny_export, vicuna_examples  # noqa: F401 - shared session fixtures
