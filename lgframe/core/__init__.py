"""The constraint contract and what every constraint shares: the `Constraint` base
and its two families (factorized constraints with a bank of shared tensors,
training-free transform constraints) in `constraint`, the registry of names in
`registry`, the roles of a model's repeated blocks in `layout`, and the per-axis,
chunk-aware resizing the transforms use in `resize`. It works on any
`nn.Module` with a config and a stack of blocks, so it needs no model of lgframe's.
"""
