"""MLflow basic-auth: the pipeline's own user, made by the admin.

MLflow's basic-auth app creates only its admin at start (``MLFLOW_AUTH_ADMIN_USERNAME`` /
``PASSWORD``, the ``mlflow-admin`` Secret in the mlflow-team overlay). The pipeline's steps and
training pods log in as the user of the ``cellseg-mlflow-auth`` Secret, which nothing creates:
without :func:`ensure_pipeline_user` every step gets 401. Run it once per MLflow server (``make
mlflow-user``); it is idempotent, and a changed password in the Secret is applied on the next run.

The user gets EDIT on the project's experiment and registered model, which the admin creates
when missing so that their owner is not whoever logged first: EDIT lets it log runs and models,
add model versions and move the ``champion``/``challenger`` aliases, not delete them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from cellseg import settings
from cellseg.errors import CellsegError
from cellseg.registry.tracking import EXPERIMENT

PIPELINE_PERMISSION = "EDIT"
ADMIN_SECRET, ADMIN_KEYS = "mlflow-admin", ("username", "password")  # manifests/secrets


@dataclass(frozen=True)
class Login:
    username: str
    password: str = field(repr=False)  # never in a log line or a traceback

    def __post_init__(self):
        if not self.username or not self.password:
            raise CellsegError("an MLflow login needs a username and a password")


@contextlib.contextmanager
def logged_in(login: Login) -> Iterator[None]:
    """MLflow's clients read their credential from the environment: ``login``'s, for a while."""
    saved = {k: os.environ.get(k) for k in settings.MLFLOW_AUTH_KEYS}
    os.environ.update(
        dict(zip(settings.MLFLOW_AUTH_KEYS, (login.username, login.password), strict=True))
    )
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_pipeline_user(
    tracking_uri: str,
    admin: Login,
    user: Login,
    model: str = settings.REGISTERED_MODEL,
    experiment: str = EXPERIMENT,
) -> list[str]:
    """Create ``user`` (or set its password), create the experiment and the registered model
    when missing, and give ``user`` EDIT on both; returns what was done, a line each."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.server.auth.permissions import (
        RESOURCE_TYPE_EXPERIMENT,
        RESOURCE_TYPE_REGISTERED_MODEL,
    )

    if user.username == admin.username:
        raise CellsegError(
            f"the pipeline's MLflow user {user.username!r} is the admin: give "
            f"{settings.MLFLOW_AUTH_SECRET} a user of its own"
        )
    done = []
    with logged_in(admin):
        auth = AuthServiceClient(tracking_uri)
        try:
            auth.get_user(user.username)
            auth.update_user_password(user.username, user.password)
            done.append(f"user {user.username}: exists, password set from the Secret")
        except MlflowException as err:  # 401/403 come as plain text: MlflowException
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise _refused(tracking_uri, err) from None
            auth.create_user(user.username, user.password)
            done.append(f"user {user.username}: created")
        tracking = MlflowClient(tracking_uri)
        found = tracking.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else tracking.create_experiment(experiment)
        try:
            tracking.get_registered_model(model)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            tracking.create_registered_model(model)
        grants = (
            (RESOURCE_TYPE_EXPERIMENT, experiment_id, f"experiment {experiment}"),
            (RESOURCE_TYPE_REGISTERED_MODEL, model, f"registered model {model}"),
        )
        for resource_type, resource_id, what in grants:
            grant = (user.username, resource_type, resource_id)
            try:
                auth.grant_user_permission(*grant, PIPELINE_PERMISSION)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                auth.revoke_user_permission(*grant)  # whatever it was, EDIT from now on
                auth.grant_user_permission(*grant, PIPELINE_PERMISSION)
            done.append(f"{what}: {user.username} may {PIPELINE_PERMISSION}")
    return done


def _refused(tracking_uri: str, err: Exception) -> CellsegError:
    code = getattr(err, "error_code", "")
    if (
        code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        or " 401 " in str(err)
        or " 403 " in str(err)
    ):
        return CellsegError(
            f"MLflow at {tracking_uri} refused the admin login ({code}): check the "
            f"{ADMIN_SECRET} Secret (the server's MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD)"
        )
    return CellsegError(f"MLflow at {tracking_uri}: {str(err).splitlines()[0]}")


class SecretUnreadable(CellsegError):
    """A Secret that is missing or may not be read; ``status`` is the API server's."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def secret_login(api_client, namespace: str, secret: str, keys: tuple[str, str]) -> Login | None:
    """A login from a Kubernetes Secret's two keys (never printed); None when both are empty
    (a Secret made only so that old KFP backends find it: no login)."""
    import base64

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        found = client.CoreV1Api(api_client).read_namespaced_secret(secret, namespace)
    except ApiException as err:
        raise SecretUnreadable(
            f"Secret {namespace}/{secret}: {err.status} {err.reason} (manifests/secrets/ has "
            "its template)",
            err.status,
        ) from None
    data = found.data or {}
    missing = [k for k in keys if k not in data]
    if missing:
        raise CellsegError(f"Secret {namespace}/{secret} has no {', '.join(missing)}")
    username, password = (base64.b64decode(data[k] or "").decode() for k in keys)
    if not username and not password:
        return None
    if not username or not password:
        empty = keys[0] if not username else keys[1]
        raise CellsegError(f"Secret {namespace}/{secret}: {empty} is empty")
    return Login(username, password)
