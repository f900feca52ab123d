"""The mlflow-team overlay's server app, for real: `mlflow server --app-name basic-auth` with the
overlay's basic_auth.ini (its database moved to SQLite here): moving `champion` needs a
credential, and the one the pipeline reads from its Secret (MLFLOW_TRACKING_USERNAME/PASSWORD)
is enough."""

import configparser

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from tests.cluster.conftest import REPO
from tests.integration.conftest import start_mlflow_server, stop

pytestmark = pytest.mark.integration
OVERLAY_INI = REPO / "manifests" / "overlays" / "mlflow-team" / "basic_auth.ini"


@pytest.fixture
def auth_server(tmp_path):
    pytest.importorskip("flask_wtf", reason="the test extra's flask-wtf (basic-auth's CSRF)")
    config = configparser.ConfigParser()
    config.read(OVERLAY_INI)
    config["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'auth.db'}"
    ini = tmp_path / "basic_auth.ini"
    with ini.open("w") as f:
        config.write(f)
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-for-the-test",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key",
    }
    proc, uri = start_mlflow_server(
        tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "--app-name", "basic-auth", env=env
    )
    yield uri
    stop(proc)


def test_moving_champion_needs_the_credential_the_pipeline_reads(auth_server, monkeypatch):
    mlflow.set_tracking_uri(auth_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-for-the-test")
    client = mlflow.MlflowClient(auth_server)
    client.create_registered_model("cellseg")
    run = client.create_run(client.create_experiment("auth-test")).info.run_id
    version = client.create_model_version("cellseg", f"runs:/{run}/model", run_id=run).version
    client.set_registered_model_alias("cellseg", "champion", version)  # with the credential

    for user, password in ((None, None), ("admin", "wrong")):
        if user is None:
            monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
            monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        with pytest.raises(MlflowException, match=r"401|[Uu]nauthori[sz]ed|credentials"):
            mlflow.MlflowClient(auth_server).set_registered_model_alias("cellseg", "champion", "1")
        with pytest.raises(MlflowException, match=r"401|[Uu]nauthori[sz]ed|credentials"):
            mlflow.MlflowClient(auth_server).get_registered_model("cellseg")


def test_the_admin_makes_the_pipelines_user_who_then_registers_and_moves_champion(
    auth_server, monkeypatch
):
    """MLflow's basic-auth app creates only its admin (``MLFLOW_AUTH_ADMIN_USERNAME``/
    ``PASSWORD``, mlflow 3.17.2 mlflow/server/auth/__init__.py); the steps log in as the
    ``cellseg-mlflow-auth`` user, who gets 401 until :func:`ensure_pipeline_user` creates it."""
    from cellseg.cluster.doctor import mlflow_login_result
    from cellseg.registry.promotion import promotion_lock
    from cellseg.registry.users import Login, ensure_pipeline_user, logged_in

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    admin = Login("admin", "s3cret-for-the-test")
    user = Login("cellseg-pipeline", "pipeline-password-1")
    with logged_in(user), pytest.raises(MlflowException, match=r"401|[Uu]nauthori[sz]ed"):
        mlflow.MlflowClient(auth_server).search_experiments()  # nobody made this user yet
    before = mlflow_login_result(auth_server, user)  # what `make doctor` reports
    assert not before.ok and before.detail.startswith("HTTP 401") and "mlflow-user" in before.fix
    anonymous = mlflow_login_result(auth_server, None)
    assert not anonymous.ok and "MLflow asks for a login" in anonymous.detail
    done = ensure_pipeline_user(auth_server, admin, user)
    assert mlflow_login_result(auth_server, user).ok
    assert done[0] == "user cellseg-pipeline: created", done
    with logged_in(user):  # what the register and promote steps do
        client = mlflow.MlflowClient(auth_server)
        experiment = client.get_experiment_by_name("cellseg").experiment_id
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, "val_pq", 0.5)
        version = client.create_model_version("cellseg", f"runs:/{run}/model", run_id=run)
        client.set_model_version_tag("cellseg", version.version, "promotion.decision", "promote")
        client.set_registered_model_alias("cellseg", "challenger", version.version)
        with promotion_lock(client, "cellseg"):  # its own model: created, then deleted
            client.set_registered_model_alias("cellseg", "champion", version.version)
        assert client.get_model_version_by_alias("cellseg", "champion").version == "1"
        with pytest.raises(MlflowException, match=r"403|PERMISSION_DENIED|[Pp]ermission"):
            client.delete_registered_model("cellseg")  # EDIT, not MANAGE
    again = ensure_pipeline_user(auth_server, admin, Login(user.username, "a-new-password-2"))
    assert again[0].startswith("user cellseg-pipeline: exists"), again
    with logged_in(user), pytest.raises(MlflowException, match=r"401|[Uu]nauthori[sz]ed"):
        mlflow.MlflowClient(auth_server).search_experiments()  # the old password is gone
    assert "s3cret" not in repr(admin) and "password-1" not in repr(user)
