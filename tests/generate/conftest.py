from conftest_ray import one_torch_thread, ray_cluster, tiny_export  # noqa: F401 - shared fixtures
