"""What the Kubernetes API clients of this package share: visionpipe/rollout/canary.py (InferenceServices) and
visionpipe/kfp/trainjob.py (TrainJobs), both over the kubernetes python client's CustomObjectsApi.

- `KubeApiError`: the one base of their API errors (``canary.ApiError``, ``trainjob.TrainJobApiError``): the
  message, the HTTP `status` (0: no answer) and the server's `causes`. Each module keeps its own error tree
  (``except RolloutError`` / ``except TrainJobError`` catch what they caught before); this base only holds the
  attributes once.
- `ErrorAnswer` / `parse_answer`: an error answer of the API server, read from the ``metav1.Status`` body it sends
  (``message``, ``details.kind``, ``details.causes[] {field, message, reason}``; k8s.io/apimachinery
  pkg/apis/meta/v1/types.go Status, StatusDetails, StatusCause). Which named error each status becomes is the
  caller's: the advice differs (which Role, which manifests to apply).
- `call`: one API call with the client's exceptions turned into the caller's named errors (an HTTP answer ->
  the caller's mapping of `ErrorAnswer`; no answer at all -> the caller's "unreachable" error).
- `CustomObjectsClient`: the constructor both API clients share (CustomObjectsApi, timeout, namespace).
- `json_dict` / `json_list` / `json_str`: total readers of the JSON objects the API returns.

Nothing here imports the kubernetes client at module level (it is imported inside `call`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

JsonObj = dict[str, object]


class KubeApiError(Exception):
    """The Kubernetes API refused a call or could not be reached: `status` is the HTTP status (0 when there was
    no answer), `causes` the server's ``details.causes`` as ``"<field>: <message>"``."""

    def __init__(self, message: str, status: int = 0, causes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.causes = tuple(causes)


class CustomObjectsClient:
    """The part both API clients share: the kubernetes client's CustomObjectsApi over a configured ApiClient
    (visionpipe/rollout/canary.py `connect_client`), the per-request timeout and the namespace the connection
    named (None: the caller must name one)."""

    def __init__(self, api_client: object, timeout_s: float = 30.0, default_namespace: str | None = None) -> None:
        from kubernetes import client

        self._api = client.CustomObjectsApi(api_client)
        self.timeout_s = timeout_s
        self.default_namespace = default_namespace


def json_dict(value: object) -> JsonObj:
    """`value` if it is a JSON object, else {}."""
    return value if isinstance(value, dict) else {}


def json_list(value: object) -> list[object]:
    """`value` if it is a JSON array, else []."""
    return value if isinstance(value, list) else []


def json_str(value: object) -> str | None:
    """`value` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class ErrorAnswer:
    """An error answer of the API server. `message`: the Status's message, else the HTTP reason, else
    ``HTTP <status>``; `details`: the Status's ``details`` ({} if none); `causes`: ``details.causes`` as
    ``"<field>: <message or reason>"`` (``<object>`` when a cause names no field)."""

    status: int
    message: str
    details: JsonObj = field(default_factory=dict)
    causes: tuple[str, ...] = ()

    @property
    def webhook_denied(self) -> bool:
        """An admission webhook refused the object. controller-runtime answers a validator's error with Denied
        (403, webhook/admission/validator_custom.go, response.go); the API server prefixes "admission webhook ...
        denied the request" (k8s.io/apiserver pkg/admission/plugin/webhook/errors/statuserror.go ToStatusErr)."""
        return self.status == 403 and "admission webhook" in self.message

    @property
    def detail(self) -> str:
        """The causes joined with "; ", else the message (what a 422 Invalid says was wrong)."""
        return "; ".join(self.causes) or self.message


def parse_answer(status: int, reason: str, body: object) -> ErrorAnswer:
    """The `ErrorAnswer` of an HTTP answer: `status` and `reason` of the response, `body` its payload (the JSON
    metav1.Status; anything else, or no body, leaves only the status and the reason)."""
    parsed: JsonObj = {}
    if isinstance(body, bytes | str):
        try:
            parsed = json_dict(json.loads(body))
        except ValueError:
            parsed = {}
    details = json_dict(parsed.get("details"))
    causes = tuple(
        f"{json_str(c.get('field')) or '<object>'}: {json_str(c.get('message')) or json_str(c.get('reason')) or ''}"
        for c in map(json_dict, json_list(details.get("causes")))
    )
    message = json_str(parsed.get("message")) or reason or f"HTTP {status}"
    return ErrorAnswer(status=status, message=message, details=details, causes=causes)


def call(
    request: Callable[[], object],
    host: str,
    refused: Callable[[int, str, object], KubeApiError],
    unreachable: Callable[[str], KubeApiError],
) -> object:
    """`request()` (one call of the kubernetes client), its result returned. An HTTP error answer (the client's
    ``ApiException``, kubernetes/client/exceptions.py: ``status``, ``reason``, ``body``) raises
    ``refused(status, reason, body)``; no answer (urllib3's ``HTTPError``: connection refused, timeout, retries
    exhausted) raises ``unreachable("cannot reach the Kubernetes API at <host>: ...")``."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return request()
    except ApiException as exc:
        raise refused(int(exc.status or 0), str(exc.reason), exc.body) from exc
    except HTTPError as exc:
        raise unreachable(f"cannot reach the Kubernetes API at {host}: {exc}") from exc


__all__ = ["ErrorAnswer", "JsonObj", "KubeApiError", "call", "json_dict", "json_list", "json_str", "parse_answer"]
