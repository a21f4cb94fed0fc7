"""Everything that reads a run directory after the fact, from its files alone.

``supervisor report`` (:func:`runreport.report.report`) loads a run's files
(:mod:`runreport.runfiles`, TensorBoard event files through
:mod:`runreport.tfevents`), works out its status, the expected-against-observed
table, the divergence verdict, the incidents and what became of each chaos fault,
and writes them as Markdown (or one HTML page) with PNG plots. The package imports
the shared :mod:`protocol` and numpy/matplotlib only, never the supervisor, the
learner or the workers, so it runs on the base install, on a host that only reads
runs.
"""
