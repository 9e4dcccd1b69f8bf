"""Applications built on the framework: `compare` (every method side by side),
`demo` (the whole chain on digits), `personalize` (DiT-BlockSkip),
`weightspace` (mLoRA weight-space learning), `control` (DivControl),
`creative` (DisTok and the creative token), `fewshot` (FAD and its baselines, in
the N-way K-shot episodes of `episodes`) and `evolve` (GTL, genetic transfer of
learngenes); `report` and `stats` are their shared tables, plots and intervals.
Each is a client of the training layer; none is imported by the framework below it.
"""
