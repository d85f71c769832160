"""The Ray Serve application: registered checkpoints behind HTTP endpoints.

::

    serve run serve/config.yaml                       # from the repository root

Two deployments. ``Ingress`` (:mod:`serve.ingress`), the FastAPI app: auth, body and image checks, JSON errors,
request timeouts, dynamic batching (a batch becomes one call per model and task, routed to a model replica holding
that model); a call whose model replica dies is sent once more to another replica. ``ModelServer``
(:mod:`serve.replica`): models pinned by :func:`pretrainlab.tracking.registry.resolve_model_source`, loaded with
:func:`pretrainlab.get_model`, multiplexed by name, a batch run in one call; alias watching.
Routes: ``POST /v1/classify``, ``POST /v1/embed``, ``POST /v1/retrieve``,
``POST /v1/caption``, ``POST /v1/vqa`` (field ``text``: the question), ``POST /v1/ground`` (field
``text``: the referring expression), ``GET /v1/models``, ``GET /healthz``.
"""

from typing import Any

from ray import serve

from serve.ingress import Ingress, read_token
from serve.replica import model_server
from serve.schemas import ServeArgs, check_args


def build_app(args: ServeArgs) -> serve.Application:
    """The application: the ``Ingress`` deployment in front of the ``ModelServer`` deployment, sized by ``args``.

    ``max_ongoing_requests``, ``max_queued_requests``, ``num_cpus``, ``num_gpus`` and the user config are the
    model servers'; the ingress holds the requests they can take and queue (twice over), on no CPU of its own.
    Both scale by ``autoscaling`` (or ``num_replicas``).

    Raises:
        ValueError: the arguments contradict each other, or the bearer token cannot be read.
    """
    check_args(args)
    read_token(args)  # fail at deploy time, not on the first request
    scale: dict[str, Any] = (
        {"autoscaling_config": args.autoscaling.model_dump()}
        if args.autoscaling is not None
        else {"num_replicas": args.num_replicas}
    )
    settings = args.model_dump()
    models = (
        model_server(args)
        .options(
            max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests,
            ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
            user_config={"alias_check_interval_s": args.alias_check_interval_s},
            **scale,
        )
        .bind(settings)
    )
    capacity = 2 * (args.max_ongoing_requests + max(args.max_queued_requests, 0))
    return Ingress.options(
        max_ongoing_requests=capacity,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
        **scale,
    ).bind(settings, models)
