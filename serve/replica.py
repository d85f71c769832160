"""The ``ModelServer`` deployment: the served models, each batch of one model's requests run in one call.

A model's source is pinned by :func:`pretrainlab.tracking.registry.resolve_model_source` and loaded with
:func:`pretrainlab.get_model` and the inferencers of its task. A replica holds up to ``max_models_per_replica``
models, loaded by request name on first use (Serve's model multiplexing). Sources that can move (an alias, a bare
``models:/NAME``) are re-resolved every ``alias_check_interval_s``; a version that moved is loaded and swapped in
while the loaded one keeps answering.
"""

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from ray import serve

import pretrainlab
from pretrainlab.inference.inferencers import (
    FeatureExtractor,
    ImageCaptionInferencer,
    ImageClassificationInferencer,
    ImageRetrievalInferencer,
    VisualGroundingInferencer,
    VisualQuestionAnsweringInferencer,
)
from pretrainlab.tracking.registry import ResolvedSource, resolve_model_source
from serve.schemas import ServeArgs

logger = logging.getLogger("ray.serve")

Item = tuple[bytes, int, str | None]  # image bytes, top_k, text (question or referring expression)
Result = dict[str, Any]  # a request's answer, or {"error", "status"}


@dataclass
class Served:
    """One loaded version of a served model and its inferencers."""

    name: str
    resolved: ResolvedSource
    task: str
    meta: dict[str, Any]
    class_names: list[str]
    classifier: Any = None
    extractor: Any = None
    retriever: Any = None
    captioner: Any = None
    answerer: Any = None
    grounder: Any = None
    gallery_size: int = 0
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` lists of this model: source, version, alias, task, metrics and routes."""
        return {
            "name": self.name,
            "source": self.resolved.source,
            "uri": self.resolved.uri,
            "version": self.resolved.version,
            "alias": self.resolved.alias,
            "task": self.task,
            "classes": len(self.class_names),
            "metrics": self.meta.get("metrics", {}),
            "epoch": self.meta.get("epoch"),
            "step": self.meta.get("step"),
            "run_id": self.meta.get("mlflow_run_id"),
            "gallery_size": self.gallery_size,
            "routes": [route for route, ready in self.routes().items() if ready],
        }

    def routes(self) -> dict[str, bool]:
        """Each image route and whether this model answers it."""
        return {
            "/v1/classify": self.classifier is not None,
            "/v1/embed": self.extractor is not None,
            "/v1/retrieve": self.retriever is not None,
            "/v1/caption": self.captioner is not None,
            "/v1/vqa": self.answerer is not None,
            "/v1/ground": self.grounder is not None,
        }


def load_served(
    name: str, resolved: ResolvedSource, gallery: str | None, gallery_dataset: str | None, device: str | None = None
) -> Served:
    """Load ``resolved.uri`` with :func:`pretrainlab.get_model` and build the inferencers of its task.

    Args:
        name: The name requests give the model.
        resolved: Its source, pinned.
        gallery: Dataset split searched by ``/v1/retrieve``; None: no retrieval.
        gallery_dataset: Prepared dataset folder of the gallery; default: the model's own dataset.
        device: Torch device; default: CUDA when there is one, else CPU.
    """
    model = pretrainlab.get_model(resolved.uri, device=device)
    info = model.info
    served = Served(name, resolved, info.task, dict(info.meta), list(info.class_names))
    if info.task == "classification":
        served.classifier = ImageClassificationInferencer(model)
    if info.task == "caption":
        served.captioner = ImageCaptionInferencer(model)
    if info.task == "vqa":
        served.answerer = VisualQuestionAnsweringInferencer(model)
    if info.task == "grounding":
        served.grounder = VisualGroundingInferencer(model)
    if isinstance(getattr(model, "backbone", None), torch.nn.Module):
        served.extractor = FeatureExtractor(model)
        if gallery:
            served.retriever = ImageRetrievalInferencer.from_split(model, split=gallery, dataset=gallery_dataset)
            served.gallery_size = len(served.retriever.gallery)
    return served


class Slot:
    """What the multiplexed loader caches per model name; the alias watcher swaps ``current``."""

    def __init__(self, served: Served) -> None:
        self.current = served


# --------------------------------------------------------------------------- tasks


def _run_each(function: Any, items: list[Any]) -> list[Any]:
    """``function(items)``; when one input is bad, each input alone, a bad one giving an error dict."""
    try:
        return list(function(items))
    except ValueError:
        pass
    results = []
    for item in items:
        try:
            results.append(function([item])[0])
        except ValueError as err:
            results.append({"error": f"image: {str(err).removeprefix('input 0: ')}", "status": 422})
    return results


def _wrong_task(served: Served, requests: list[Item], wanted: str) -> list[Result]:
    return [{"error": f"{served.name} is a {served.task} model, not a {wanted} model", "status": 400}] * len(requests)


def _classify(served: Served, requests: list[Item]) -> list[Result]:
    if served.classifier is None:
        return _wrong_task(served, requests, "classification")
    top = max(top_k for _, top_k, _ in requests)
    results = _run_each(
        lambda images: served.classifier(images, batch_size=len(images), topk=top), [r[0] for r in requests]
    )
    return [
        result
        if "error" in result
        else {
            "pred_label": result["pred_label"],
            "pred_score": result["pred_score"],
            "pred_class": result["pred_class"],
            "pred_scores": [float(score) for score in result["pred_scores"]],
            "pred_topk": result["pred_topk"][:top_k],
        }
        for result, (_, top_k, _) in zip(results, requests, strict=True)
    ]


def _embed(served: Served, requests: list[Item]) -> list[Result]:
    if served.extractor is None:
        return [{"error": f"{served.name} has no backbone to embed with", "status": 400}] * len(requests)
    results = _run_each(lambda images: served.extractor(images, batch_size=len(images)), [r[0] for r in requests])
    return [
        result if isinstance(result, dict) else {"embedding": [float(x) for x in result], "dim": int(result.shape[0])}
        for result in results
    ]


def _retrieve(served: Served, requests: list[Item]) -> list[Result]:
    if served.retriever is None:
        return [{"error": "no retrieval gallery is served (set the gallery argument)", "status": 404}] * len(requests)
    top = max(top_k for _, top_k, _ in requests)
    results = _run_each(
        lambda images: served.retriever(images, batch_size=len(images), topk=top), [r[0] for r in requests]
    )
    return [
        result
        if "error" in result
        else {"match_score": result["match_score"][:top_k], "sample_idx": result["sample_idx"][:top_k]}
        for result, (_, top_k, _) in zip(results, requests, strict=True)
    ]


def _caption(served: Served, requests: list[Item]) -> list[Result]:
    if served.captioner is None:
        return _wrong_task(served, requests, "caption")
    results = _run_each(lambda images: served.captioner(images, batch_size=len(images)), [r[0] for r in requests])
    return [r if "error" in r else {"pred_caption": r["pred_caption"], "score": r["score"]} for r in results]


def _with_text(function: Any, field_name: str) -> Any:
    """``function(images, texts)`` over (image, text) items, an item without text answering 422."""

    def run(items: list[tuple[bytes, str | None]]) -> list[Result]:
        missing = [i for i, (_, text) in enumerate(items) if not text]
        if missing and len(items) > 1:
            raise ValueError("an item without text")  # _run_each then answers item by item
        if missing:
            return [{"error": f"text: field required (the {field_name})", "status": 422}]
        return function([image for image, _ in items], [text for _, text in items])

    return run


def _vqa(served: Served, requests: list[Item]) -> list[Result]:
    if served.answerer is None:
        return _wrong_task(served, requests, "vqa")
    answer = _with_text(lambda images, texts: served.answerer(images, texts, batch_size=len(images)), "question")
    results = _run_each(answer, [(image, text) for image, _, text in requests])
    return [r if "error" in r else {"question": r["question"], "pred_answer": r["pred_answer"]} for r in results]


def _ground(served: Served, requests: list[Item]) -> list[Result]:
    if served.grounder is None:
        return _wrong_task(served, requests, "grounding")
    ground = _with_text(lambda images, texts: served.grounder(images, texts, batch_size=len(images)), "expression")
    results = _run_each(ground, [(image, text) for image, _, text in requests])
    return [r if "error" in r else {"text": r["text"], "pred_bbox": r["pred_bbox"]} for r in results]


TASKS = {
    "classify": _classify,
    "embed": _embed,
    "retrieve": _retrieve,
    "caption": _caption,
    "vqa": _vqa,
    "ground": _ground,
}

# --------------------------------------------------------------------------- deployment


class ModelReplica:
    """A ``ModelServer`` replica: models loaded by name, a batch of one model's requests run in one call, moved
    aliases swapped in. :func:`model_server` makes it a deployment with its multiplexed loader ``slot``."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(settings)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels
        self.interval = self.args.alias_check_interval_s
        self.slots: weakref.WeakValueDictionary[str, Slot] = weakref.WeakValueDictionary()
        self.watcher: asyncio.Task | None = None
        self.swap_lock = asyncio.Lock()
        self.compute = asyncio.Lock()  # one batch at a time on the replica's torch threads

    async def slot(self, name: str) -> Slot:
        """Model ``name``'s slot; :func:`model_server` replaces this with the multiplexed :meth:`load_slot`."""
        raise NotImplementedError

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``alias_check_interval_s``; any change also re-resolves aliases now."""
        self.interval = float(config.get("alias_check_interval_s", self.interval))
        if self.slots:
            await self.refresh()

    async def load_slot(self, name: str) -> Slot:
        """Resolve and load model ``name``'s source, and keep its alias watched."""
        resolved = await asyncio.to_thread(resolve_model_source, self.args.models[name], self.args.tracking_uri)
        slot = Slot(await asyncio.to_thread(self._load, name, resolved))
        self.slots[name] = slot
        self._start_watcher()
        return slot

    def _load(self, name: str, resolved: ResolvedSource) -> Served:
        return load_served(name, resolved, self.args.gallery, self.args.gallery_dataset, self.args.device)

    def _start_watcher(self) -> None:
        if self.watcher is None or self.watcher.done():
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval if self.interval > 0 else 5.0)
            if self.interval > 0:
                await self.refresh()

    async def refresh(self) -> list[str]:
        """Re-resolve every loaded alias; load and swap in the versions that moved. Returns the swapped names."""
        swapped = []
        async with self.swap_lock:
            for name, slot in list(self.slots.items()):
                if slot.current.resolved.watch and await self._swap(name, slot):
                    swapped.append(name)
        return swapped

    async def _swap(self, name: str, slot: Slot) -> bool:
        """Swap in the version ``slot``'s source names now, if it moved; a failure keeps the loaded one."""
        served = slot.current
        try:
            resolved = await asyncio.to_thread(resolve_model_source, served.resolved.source, self.args.tracking_uri)
            if resolved.uri == served.resolved.uri:
                return False
            slot.current = await asyncio.to_thread(self._load, name, resolved)
        except Exception as err:  # a store hiccup or a broken version keeps the loaded one
            logger.warning("%s: keeping %s: %s", name, served.resolved.uri, err)
            return False
        logger.info("%s: swapped %s -> %s", name, served.resolved.uri, resolved.uri)
        return True

    async def run(self, task: str, items: list[Item]) -> list[Result]:
        """A batch of ``task`` requests for the model the call is multiplexed to, run in one call.

        Returns:
            Each request's result, or ``{"error", "status"}``.
        """
        served = (await self.slot(serve.get_multiplexed_model_id())).current
        async with self.compute:
            results = await asyncio.to_thread(TASKS[task], served, items)
        return [{"model": served.name, "version": served.resolved.version, **result} for result in results]

    async def describe(self) -> dict[str, Any]:
        """What :meth:`Served.describe` says of the model the call is multiplexed to."""
        return (await self.slot(serve.get_multiplexed_model_id())).current.describe()


def model_server(args: ServeArgs) -> serve.Deployment:
    """The ``ModelServer`` deployment: :class:`ModelReplica` holding up to ``args.max_models_per_replica`` models.

    ``@serve.multiplexed`` takes its limit when it decorates the loader, and Serve sees the loader on the class,
    so each application gets its own subclass.
    """

    class ModelServer(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)
        async def slot(self, name: str) -> Slot:
            """Model ``name``'s slot, loaded on first use; past the limit the least recently used is unloaded."""
            return await self.load_slot(name)

    return serve.deployment(name="ModelServer")(ModelServer)
