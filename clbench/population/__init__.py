"""Many runs in one process: a population of members that differ only in seed or numeric hyper-parameters.

``python -m clbench -m hydra/launcher=population seed=0,1,2,3,4,5,6,7,8,9`` runs the sweep's jobs whose configs
differ only in ``seed`` and in numeric values the strategy declares batchable as one population
(:mod:`hydra_plugins.clbench_launchers.population_launcher`, :mod:`clbench.population.grouping`). Each member
is its solo run, in a thread of its own (:mod:`clbench.population.baton`), with its own result files; their fits
are trained together as one batched model (:mod:`clbench.population.batched`, coordinated by
:mod:`clbench.population.coordinator`). This module stays empty of imports: ``clbench.trainer`` reads
:mod:`clbench.population.rendezvous` on every run.
"""
