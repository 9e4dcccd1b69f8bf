"""Applications built on the framework: `compare` (every method side by side),
`demo` (the whole chain on digits), `personalize` (DiT-BlockSkip),
`weightspace` (mLoRA weight-space learning). Each is a client of the training
layer; none is imported by the framework below it.
"""
