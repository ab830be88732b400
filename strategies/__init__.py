"""clbench's strategies: one module per method family, each a :class:`clbench.strategy.Strategy`.

A strategy is chosen by its YAML in ``conf/strategy/`` (``_target_`` names the class); nothing here is
registered by hand, so a user's own class anywhere on the Python path plugs in the same way.
"""
