"""`distill prune`: a smaller Hugging Face student cut out of its teacher, Minitron-style.

Pieces: `targets.py` turns the size flags (or a parameter count) into the pruned `ModelConfig` and
refuses what cannot be built; `calibrate.py` runs the teacher over calibration tokens once and
gathers the activation statistics (and, for `--depth importance`, the cost of skipping each layer);
`slicing.py` picks the kept indices and cuts the teacher's tensors; `run.py` ties them together,
writes the folder and the report.

Design choice: statistics come from our own megatron-core model (`pipeline.model.load_model`) via
forward hooks, and the pruned weights are cut straight from the teacher's stored tensors (in their
stored dtype), one tensor at a time, so nothing is re-implemented and an identity prune is the
teacher bit for bit. The teacher runs at `--tp N` over a world of exactly N processes (each holds its
TP slices; their statistics are all-gathered), and rank 0 alone cuts and writes. The cost: rank 0 reads
every stored teacher tensor once more while cutting (one at a time; a TP checkpoint is joined into a
temporary Hugging Face folder on rank 0 for that), no data parallelism over the calibration samples,
and `--depth importance` runs the teacher once more per layer over the calibration tokens.
"""
