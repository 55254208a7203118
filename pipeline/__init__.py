"""Distillation pipeline: config, parallel layout, losses, models, data, teacher cache, trainer."""
