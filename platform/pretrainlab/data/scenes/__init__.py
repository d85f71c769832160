"""``scenes``: a generated CLEVR-like image-text set that exercises every image-text head.

Images of 2-6 objects (Pillow shapes and Fashion-MNIST silhouettes, 8 colours, 2
sizes, with occlusion, on optional scikit-image textures) with their scene graphs;
captions, CLEVR-style questions with rebalanced answers, referring expressions with
boxes, and hard-negative captions, all computed from the scene graph; a CoGenT-style
compositional test split. ``write_scenes`` writes the caption, vqa, grounding and
retrieval datasets; ``generate_scene`` and the text functions let callers check
any image's text against its scene graph.

Modules, one job each: ``grammar`` (vocabulary), ``masks`` (object shapes),
``layout`` (placement and scene graph), ``render`` (pixels), ``splits`` (held-out
combinations), ``scene`` (one image), ``language`` (captions, references,
negatives), ``questions`` (questions and answer rebalancing), ``writer`` (datasets).
"""

from pretrainlab.data.scenes.language import (
    Description,
    Reference,
    captions,
    hard_negative,
    minimal_descriptions,
    referring_expressions,
)
from pretrainlab.data.scenes.layout import SceneObject, relation_holds
from pretrainlab.data.scenes.questions import ANSWERS, QUESTION_TYPES, AnswerBalancer, Question, candidate_questions
from pretrainlab.data.scenes.scene import Scene, generate_scene
from pretrainlab.data.scenes.splits import COMPOSITIONAL_SPLIT, SPLIT_FRACTIONS, held_out_combinations
from pretrainlab.data.scenes.writer import GENERATOR_VERSION, TASKS, describe_scene, write_scenes

__all__ = [
    "ANSWERS",
    "COMPOSITIONAL_SPLIT",
    "GENERATOR_VERSION",
    "QUESTION_TYPES",
    "SPLIT_FRACTIONS",
    "TASKS",
    "AnswerBalancer",
    "Description",
    "Question",
    "Reference",
    "Scene",
    "SceneObject",
    "candidate_questions",
    "captions",
    "describe_scene",
    "generate_scene",
    "hard_negative",
    "held_out_combinations",
    "minimal_descriptions",
    "referring_expressions",
    "relation_holds",
    "write_scenes",
]
