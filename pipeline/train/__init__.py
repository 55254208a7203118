"""The student trainer: DeepSpeed ZeRO-3 engine, training loop, checkpoints, eval, TensorBoard, export."""
