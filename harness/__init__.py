"""The project's harness, shared by the tests, the benchmarks and the soak: a real stack started and always
cleaned up (:mod:`harness.stack`), and CARLA's stand-ins (:mod:`harness.carla`, :mod:`harness.fakecarla`).
Nothing in the product imports it."""
