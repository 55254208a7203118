"""An online teacher beside the student, and the prefixes it scores: corpus, teacher-sampled, student-sampled.

`teacher.py` loads the teacher at the student's TP layout and turns a micro-batch into dense targets;
`prefixes.py` replaces a step's samples by continuations the teacher or the student generates
(f-DISTILL's sequence-level variants, on-policy distillation).
"""
