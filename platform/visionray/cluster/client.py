"""The Jobs API client: the head's Jobs API URL for an address (``--address``, else
``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``, else a local head), the cluster's token only where it
may travel, and submit, status, logs, follow and stop."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
HTTP_TIMEOUT_S = 10.0  # s the client waits for the head's dashboard to answer

class JobsError(Exception):
    """A problem the user can fix: each line says what is wrong and how to fix it."""

    def __init__(self, lines: str | list[str], title: str = "cannot submit"):
        self.lines = [lines] if isinstance(lines, str) else lines
        self.title = title
        super().__init__("; ".join(self.lines))


# --------------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def _explicit_address(address: str | None) -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS/RAY_ADDRESS override an address passed in code; here an
    explicit ``--address`` wins, and without one those variables apply as usual."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if address is not None and n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def api_server_url(address: str | None) -> str:
    """The head's Jobs API URL for ``address`` (http://HEAD:8265, a GCS address HEAD:6379, ray://),
    or from RAY_API_SERVER_ADDRESS / RAY_ADDRESS, or a Ray started on this machine."""
    from ray.dashboard.utils import get_address_for_submission_client

    with _explicit_address(address):
        try:
            url = get_address_for_submission_client(address)
        except ConnectionError as exc:
            raise JobsError([str(exc).splitlines()[0], "pass --address http://HEAD:8265 or set RAY_ADDRESS"],
                            "no Ray cluster found") from None
    return url if "://" in url else f"http://{url}"


def _loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(url: str, insecure_token: bool = False) -> None:
    """``JobsError`` unless the token may go to ``url``: https, loopback, or the explicit flag."""
    if url.startswith("http://") and not _loopback(url) and not insecure_token:
        raise JobsError([f"{url} asks for Ray's authentication token over plain http: it would cross the network "
                         "unencrypted, readable by anyone on the path",
                         "reach the head over https (a TLS proxy in front of the dashboard) or an SSH tunnel to "
                         "127.0.0.1:8265, or pass --insecure-token when this network is trusted"],
                        "refusing to send the token")


def auth_headers(url: str, insecure_token: bool = False) -> dict[str, str]:
    """The ``Authorization`` header when the head enforces Ray's token authentication.

    The head says its mode on ``/api/authentication_mode`` (open to all). The token comes from
    where Ray's own clients read it: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, or
    ``~/.ray/auth_token``. Ray's client adds it by itself only when ``RAY_AUTH_MODE=token`` is set
    locally; asking the head makes ``visionray`` work against token clusters without that."""
    import httpx
    from ray._raylet import AuthenticationTokenLoader

    try:
        response = httpx.get(f"{url}/api/authentication_mode", timeout=HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise JobsError([f"{url}: {type(exc).__name__}: {exc}",
                         "check --address (the head's dashboard port, 8265 by default) and that the head is up"],
                        "cannot reach the Ray cluster") from None
    mode = response.json().get("authentication_mode") if response.status_code == 200 else None
    if mode != "token":
        return {}
    check_token_transport(url, insecure_token)
    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        raise JobsError([f"{url} requires Ray's authentication token and none was found here",
                         "copy it from the head (`ray get-auth-token` there) into ~/.ray/auth_token, or set "
                         "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"], "authentication required")
    return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"}


def connect(address: str | None = None, insecure_token: bool = False):
    """A ``JobSubmissionClient`` for the cluster at ``address`` (see ``api_server_url``). The token
    goes only to that address, and over plain http only to loopback unless ``insecure_token``."""
    from ray.job_submission import JobSubmissionClient

    url = api_server_url(address)
    headers = auth_headers(url, insecure_token)
    with _explicit_address(address):
        try:
            return JobSubmissionClient(url, headers=headers)
        except (ConnectionError, RuntimeError) as exc:
            raise JobsError([f"{url}: {str(exc).strip().splitlines()[0]}"], "cannot reach the Ray cluster") from None


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        raise JobsError(_missing(job_id, exc), "no such job") from None


def _missing(job_id: str, exc: Exception) -> list[str]:
    return [f"{job_id}: {str(exc).strip().splitlines()[0]}", "`visionray jobs list` shows the cluster's jobs"]


def logs(client, job_id: str) -> str:
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as exc:
        raise JobsError(_missing(job_id, exc), "no such job") from None


def follow(client, job_id: str) -> Iterator[str]:
    """The job's log from its start, as it grows, until the job ends."""
    import asyncio

    job_info(client, job_id)  # a clear error for an unknown id, before streaming
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(client, job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    try:
        return client.stop_job(job_id)
    except RuntimeError as exc:
        raise JobsError(_missing(job_id, exc), "no such job") from None
