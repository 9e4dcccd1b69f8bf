"""Training: recipes (`recipes`: a typed schema, every key and range checked), the
LightningModules (`tasks`), the stages as functions (`stages`: fit, extract the
learngene, descend, sample, evaluate), run folders and their lock (`rundir`),
checkpointing (`checkpointing`), sharded training (`distributed`) and the
sample-quality metrics (`metrics`). Applications build their trainers through it.
"""
