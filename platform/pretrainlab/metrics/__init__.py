"""Evaluation metrics for image-text tasks, as pure functions.

- captioning: corpus BLEU-1..4 and CIDEr-D of captions against several references per image.
- vqa: VQAv2 answer normalisation, exact match and the VQAv2 soft accuracy, per question type.
- grounding: element-wise box IoU, accuracy at IoU >= 0.5 and mean IoU.
"""
