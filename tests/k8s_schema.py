"""Validate Kubernetes objects the way the API server does, offline (a test helper).

Custom resources are checked against their CRD's `openAPIV3Schema` from the platform folder
(`../shared/platform/`, upstream CRDs: KServe, Istio, Gateway API, Kubeflow Trainer), picked by the object's
group, version and kind. Structural-schema semantics, as in k8s.io/apiextensions-apiserver
(pkg/apiserver/schema/..., pkg/registry/customresource/validator.go):

- `type` (object / array / string / integer / number / boolean), `nullable` (a null elsewhere is dropped by
  the server: an error here), `x-kubernetes-int-or-string`, `enum`, `pattern`, `format` (int32, int64, byte,
  date-time), `minimum` / `maximum` (+ exclusive), `multipleOf`, `minLength` / `maxLength`, `minItems` /
  `maxItems`, `minProperties` / `maxProperties`, `required`, `properties`, `additionalProperties`, `items`,
  `allOf` / `anyOf` / `oneOf` / `not` (value validations), `x-kubernetes-list-type` set / map uniqueness,
  `default` (applied before validation, as the server does), `x-kubernetes-preserve-unknown-fields`,
  `x-kubernetes-embedded-resource` (apiVersion / kind / metadata allowed and checked);
- a field the schema neither lists nor preserves would be PRUNED (silently dropped) by the server, or refused
  by `kubectl apply`'s strict field validation: here it is an ERROR;
- top-level `metadata` is validated like ObjectMeta: name required, a DNS-1123 subdomain for custom resources
  (validator.go: `ValidateObjectMetaAccessor(..., NameIsDNSSubdomain, ...)`), no namespace on cluster-scoped
  kinds, labels and annotations as string maps with qualified-name keys (k8s.io/apimachinery
  pkg/api/validation/objectmeta.go, pkg/apis/meta/v1/validation/validation.go);
- `x-kubernetes-validations` (CEL): a few simple rule shapes are evaluated (numeric bounds, `self == oldSelf`
  on updates, `has(...)`/type pairings of Gateway API filters, name rules); every other rule is NOT evaluated
  and is listed in `Result.unevaluated` with its path, so a test can see what was skipped.

Core kinds (ServiceAccount, Secret, ConfigMap, Deployment, Service, Role, RoleBinding, ...) have no CRD here:
they go through the kubernetes python client's typed models (an unknown field is reported as pruned, a missing
required field by the model's own client-side check), plus ObjectMeta and a few cheap server-side rules.

Every issue names the JSON path of the offending value, e.g. `spec.canary[0].predictor.model.name`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import functools
import importlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Final

import yaml

PLATFORM: Final = Path(
    os.environ.get("VISIONPIPE_PLATFORM_DIR", Path(__file__).resolve().parents[2] / "shared" / "platform")
)

_MISSING: Final = object()


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Issue:
    """One reason the API server (or an admission webhook) would refuse or alter the object."""

    path: str
    message: str
    source: str = "schema"

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message} [{self.source}]"


@dataclass
class Result:
    errors: list[Issue] = field(default_factory=list)
    unevaluated: list[Issue] = field(default_factory=list)  # CEL rules this helper does not evaluate

    @property
    def ok(self) -> bool:
        return not self.errors

    def extend(self, other: Result) -> None:
        self.errors += other.errors
        self.unevaluated += other.unevaluated

    def describe(self) -> str:
        return "\n".join(str(issue) for issue in self.errors) or "ok"


def child(path: str, key: str | int) -> str:
    """JSON path of `key` below `path`: `a.b`, `a[0]`, `a["serving.kserve.io/x"]`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


# --------------------------------------------------------------------------------------------- names
# k8s.io/apimachinery/pkg/util/validation/validation.go
DNS1123_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME: Final = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE: Final = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME: Final = re.compile(r"^(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


def name_problems(name: str, rule: str) -> list[str]:
    """What is wrong with `name` as a `rule` ("subdomain", "label", "dns1035", "path-segment") name."""
    if rule == "subdomain":
        if len(name) > 253:
            return ["must be no more than 253 characters"]
        ok = DNS1123_SUBDOMAIN.match(name)
        return [] if ok else ["must be a lowercase RFC 1123 subdomain (a-z, 0-9, '-', '.'; alphanumeric ends)"]
    if rule == "label":
        if len(name) > 63:
            return ["must be no more than 63 characters"]
        return [] if DNS1123_LABEL.match(name) else ["must be a lowercase RFC 1123 label (a-z, 0-9, '-')"]
    if rule == "dns1035":
        if len(name) > 63:
            return ["must be no more than 63 characters"]
        return [] if DNS1035_LABEL.match(name) else ["must be an RFC 1035 label (start with a letter; a-z, 0-9, '-')"]
    if rule == "path-segment":  # k8s.io/apimachinery/pkg/api/validation/path/name.go
        if name in (".", ".."):
            return [f"may not be {name!r}"]
        return [f"may not contain {c!r}" for c in ("/", "%") if c in name]
    raise ValueError(f"unknown name rule {rule!r}")


def qualified_name_problems(key: str) -> list[str]:
    """Label / annotation key: optional DNS-subdomain prefix (<= 253) + '/' + name (<= 63)."""
    prefix, _, name = key.rpartition("/")
    problems: list[str] = []
    if "/" in key and not prefix:
        problems.append("prefix part must be non-empty")
    if prefix:
        problems += [f"prefix part {p}" for p in name_problems(prefix, "subdomain")]
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    elif not QUALIFIED_NAME.match(name):
        problems.append("name part must consist of alphanumerics, '-', '_' or '.', starting and ending alphanumeric")
    return problems


OBJECT_META_FIELDS: Final = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)


def validate_object_meta(
    meta: object, path: str, *, namespaced: bool, name_rule: str | None, source: str = "metadata"
) -> list[Issue]:
    """ObjectMeta checks (apimachinery pkg/api/validation/objectmeta.go). `name_rule=None`: name optional and
    unchecked (embedded / template metadata)."""
    if not isinstance(meta, dict):
        return [Issue(path, f"must be an object, got {type(meta).__name__}", source)]
    issues: list[Issue] = []
    for key in meta:
        if key not in OBJECT_META_FIELDS:
            issues.append(Issue(child(path, key), "unknown ObjectMeta field (dropped by the API server)", source))
    name = meta.get("name")
    if name_rule is not None:
        if name is None and not meta.get("generateName"):
            issues.append(Issue(child(path, "name"), "name or generateName is required", source))
        elif name is not None and not isinstance(name, str):
            issues.append(Issue(child(path, "name"), "must be a string", source))
        elif isinstance(name, str):
            issues += [Issue(child(path, "name"), f"{name!r} {p}", source) for p in name_problems(name, name_rule)]
    namespace = meta.get("namespace")
    if namespace not in (None, ""):
        if not namespaced:
            issues.append(Issue(child(path, "namespace"), "not allowed on this (cluster-scoped) type", source))
        elif not isinstance(namespace, str) or name_problems(namespace, "label"):
            issues.append(Issue(child(path, "namespace"), f"{namespace!r} is not a valid namespace name", source))
    for map_name, check_value in (("labels", True), ("annotations", False)):
        values = meta.get(map_name)
        if values is None:
            continue
        map_path = child(path, map_name)
        if not isinstance(values, dict):
            issues.append(Issue(map_path, "must be a map of string keys to string values", source))
            continue
        total = 0
        for key, value in values.items():
            here = child(map_path, str(key))
            # annotations keys are checked lower-cased (ValidateAnnotations); labels as they are
            for problem in qualified_name_problems(str(key) if check_value else str(key).lower()):
                issues.append(Issue(here, f"key {key!r}: {problem}", source))
            if not isinstance(value, str):
                issues.append(Issue(here, f"value must be a string, got {type(value).__name__} {value!r}", source))
                continue
            total += len(str(key)) + len(value)
            if check_value and (len(value) > 63 or not LABEL_VALUE.match(value)):
                issues.append(Issue(here, f"label value {value!r} is invalid (<= 63 chars, alphanumeric ends)", source))
        if not check_value and total > 256 * 1024:
            issues.append(Issue(map_path, "annotations may not exceed 256 KiB in total", source))
    finalizers = meta.get("finalizers")
    if finalizers is not None and (not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)):
        issues.append(Issue(child(path, "finalizers"), "must be a list of strings", source))
    return issues


# --------------------------------------------------------------------------------------------- CRDs
@dataclass(frozen=True)
class CrdVersion:
    group: str
    kind: str
    version: str
    namespaced: bool
    served: bool
    schema: Mapping[str, object]
    has_status_subresource: bool
    source_file: str


@functools.lru_cache(maxsize=4)
def load_platform(root: Path = PLATFORM) -> dict[tuple[str, str, str], CrdVersion]:
    """(group, version, kind) -> the CRD version, for every CRD under `root`."""
    if not root.is_dir():
        raise FileNotFoundError(f"platform CRDs not found at {root} (set VISIONPIPE_PLATFORM_DIR)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    found: dict[tuple[str, str, str], CrdVersion] = {}
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema", {})
                key = (spec["group"], version["name"], spec["names"]["kind"])
                found[key] = CrdVersion(
                    group=spec["group"],
                    kind=spec["names"]["kind"],
                    version=version["name"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    served=bool(version.get("served", True)),
                    schema=schema,
                    has_status_subresource="status" in (version.get("subresources") or {}),
                    source_file=str(path.relative_to(root)),
                )
    return found


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def find_crd(api_version: str, kind: str, root: Path = PLATFORM) -> CrdVersion | None:
    group, version = split_api_version(api_version)
    return load_platform(root).get((group, version, kind))


# --------------------------------------------------------------------------------------------- schema walk
def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_matches(value: object, expected: str) -> bool:
    actual = _type_name(value)
    if expected == "number":
        return actual in ("integer", "number")
    if expected == "integer" and isinstance(value, float):
        return value.is_integer()
    return actual == expected


_FORMAT_RANGES: Final = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _json_equal(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class SchemaWalker:
    """One structural-schema validation of one value (mutates it: defaults are applied in place)."""

    def __init__(self, source: str = "schema") -> None:
        self.result = Result()
        self.source = source

    def error(self, path: str, message: str) -> None:
        self.result.errors.append(Issue(path, message, self.source))

    # -- entry ------------------------------------------------------------------------------------------
    def walk(self, value: object, schema: Mapping[str, object], path: str, old: object = _MISSING) -> None:
        if value is None:
            if not schema.get("nullable"):
                self.error(path, "null is not allowed here (the API server drops it)")
            return
        if schema.get("x-kubernetes-int-or-string"):
            if _type_name(value) not in ("integer", "string"):
                self.error(path, f"must be an integer or a string, got {_type_name(value)}")
                return
        elif "type" in schema:
            expected = str(schema["type"])
            if not _type_matches(value, expected):
                self.error(path, f"must be of type {expected}, got {_type_name(value)} {_short(value)}")
                return
        self.value_checks(value, schema, path)
        if isinstance(value, dict):
            self.walk_object(value, schema, path, old)
        elif isinstance(value, list):
            self.walk_array(value, schema, path, old)
        self.cel(value, schema, path, old)

    # -- objects ----------------------------------------------------------------------------------------
    def walk_object(self, value: dict[str, object], schema: Mapping[str, object], path: str, old: object) -> None:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        embedded = schema.get("x-kubernetes-embedded-resource") is True
        for name, sub in props.items():  # defaulting happens before validation on the server
            if name not in value and isinstance(sub, dict) and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        old_map = old if isinstance(old, dict) else {}
        for key, item in value.items():
            here = child(path, key)
            old_item = old_map.get(key, _MISSING)
            if key in props and isinstance(props[key], dict):
                if embedded and key == "metadata":
                    self.result.errors += validate_object_meta(item, here, namespaced=True, name_rule=None)
                    continue
                self.walk(item, props[key], here, old_item)
            elif isinstance(additional, dict):
                self.walk(item, additional, here, old_item)
            elif additional is True or preserve:
                continue
            elif embedded and key in ("apiVersion", "kind"):
                if not isinstance(item, str):
                    self.error(here, "must be a string")
            elif embedded and key == "metadata":
                self.result.errors += validate_object_meta(item, here, namespaced=True, name_rule=None)
            else:
                self.error(here, "unknown field: the schema does not declare it, so the API server prunes it")
        if embedded:
            for key in ("apiVersion", "kind"):
                if key not in value:
                    self.error(child(path, key), "required for an embedded resource")
        for name in schema.get("required", []) or []:  # type: ignore[attr-defined]
            if name not in value:
                self.error(child(path, str(name)), "required field is missing")
        count = len(value)
        if "minProperties" in schema and count < int(schema["minProperties"]):  # type: ignore[call-overload]
            self.error(path, f"must have at least {schema['minProperties']} properties")
        if "maxProperties" in schema and count > int(schema["maxProperties"]):  # type: ignore[call-overload]
            self.error(path, f"must have at most {schema['maxProperties']} properties")

    # -- arrays -----------------------------------------------------------------------------------------
    def walk_array(self, value: list[object], schema: Mapping[str, object], path: str, old: object) -> None:
        items = schema.get("items")
        list_type = schema.get("x-kubernetes-list-type")
        keys = [str(k) for k in schema.get("x-kubernetes-list-map-keys", []) or []]  # type: ignore[attr-defined]
        old_by_key: dict[str, object] = {}
        if list_type == "map" and isinstance(old, list):
            old_by_key = {_map_key(o, keys): o for o in old if isinstance(o, dict)}
        if isinstance(items, dict):
            for index, item in enumerate(value):
                old_item = old_by_key.get(_map_key(item, keys), _MISSING) if isinstance(item, dict) else _MISSING
                self.walk(item, items, child(path, index), old_item)
        if "minItems" in schema and len(value) < int(schema["minItems"]):  # type: ignore[call-overload]
            self.error(path, f"must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > int(schema["maxItems"]):  # type: ignore[call-overload]
            self.error(path, f"must have at most {schema['maxItems']} items")
        if list_type == "set" or schema.get("uniqueItems"):
            seen: set[str] = set()
            for index, item in enumerate(value):
                marker = json.dumps(item, sort_keys=True)
                if marker in seen:
                    self.error(child(path, index), "duplicate entry in a list of type set")
                seen.add(marker)
        elif list_type == "map" and keys:
            seen_keys: set[str] = set()
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                marker = _map_key(item, keys)
                if marker in seen_keys:
                    self.error(child(path, index), f"duplicate entry for key(s) {keys} in a list of type map")
                seen_keys.add(marker)

    # -- scalars and combinators ------------------------------------------------------------------------
    def value_checks(self, value: object, schema: Mapping[str, object], path: str) -> None:
        enum = schema.get("enum")
        if isinstance(enum, list) and not any(_json_equal(value, allowed) for allowed in enum):
            self.error(path, f"unsupported value {_short(value)}: must be one of {enum}")
        if isinstance(value, str):
            if "minLength" in schema and len(value) < int(schema["minLength"]):  # type: ignore[call-overload]
                self.error(path, f"must be at least {schema['minLength']} characters")
            if "maxLength" in schema and len(value) > int(schema["maxLength"]):  # type: ignore[call-overload]
                self.error(path, f"may not be more than {schema['maxLength']} characters")
            pattern = schema.get("pattern")
            if isinstance(pattern, str) and re.search(pattern, value) is None:
                self.error(path, f"{value!r} does not match pattern {pattern!r}")
            fmt = schema.get("format")
            if fmt == "byte":
                try:
                    base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    self.error(path, "must be base64 (format byte)")
            elif fmt == "date-time":
                try:
                    dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    self.error(path, f"{value!r} is not an RFC 3339 date-time")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fmt = schema.get("format")
            if isinstance(fmt, str) and fmt in _FORMAT_RANGES and isinstance(value, int):
                low, high = _FORMAT_RANGES[fmt]
                if not low <= value <= high:
                    self.error(path, f"{value} is out of range for {fmt}")
            self.bounds(value, schema, path)
        for key in ("allOf", "anyOf", "oneOf"):
            subs = schema.get(key)
            if not isinstance(subs, list):
                continue
            passing = [not self.sub_errors(value, sub, path) for sub in subs if isinstance(sub, dict)]
            if key == "allOf" and not all(passing):
                for sub in subs:
                    for issue in self.sub_errors(value, sub, path):
                        self.result.errors.append(issue)
            if key == "anyOf" and not any(passing):
                self.error(path, f"must match at least one schema in anyOf ({_short(value)})")
            if key == "oneOf" and sum(passing) != 1:
                self.error(path, f"must match exactly one schema in oneOf, matched {sum(passing)}")
        negated = schema.get("not")
        if isinstance(negated, dict) and not self.sub_errors(value, negated, path):
            self.error(path, "must not match the schema in `not`")

    def bounds(self, value: float, schema: Mapping[str, object], path: str) -> None:
        minimum, maximum = schema.get("minimum"), schema.get("maximum")
        exclusive_min, exclusive_max = schema.get("exclusiveMinimum") is True, schema.get("exclusiveMaximum") is True
        if isinstance(minimum, (int, float)) and (value < minimum or (exclusive_min and value == minimum)):
            self.error(path, f"{value} is below the minimum {minimum}")
        if isinstance(maximum, (int, float)) and (value > maximum or (exclusive_max and value == maximum)):
            self.error(path, f"{value} is above the maximum {maximum}")
        multiple = schema.get("multipleOf")
        if (
            isinstance(multiple, (int, float))
            and multiple
            and not math.isclose(value / multiple, round(value / multiple))
        ):
            self.error(path, f"{value} is not a multiple of {multiple}")

    def sub_errors(self, value: object, sub: Mapping[str, object], path: str) -> list[Issue]:
        """Errors of `value` against a combinator branch (value validation only: no pruning, no defaults)."""
        walker = SchemaWalker(self.source)
        walker.value_only(copy.deepcopy(value), sub, path)
        return walker.result.errors

    def value_only(self, value: object, schema: Mapping[str, object], path: str) -> None:
        if value is None:
            return
        if "type" in schema and not _type_matches(value, str(schema["type"])):
            self.error(path, f"must be of type {schema['type']}")
            return
        self.value_checks(value, schema, path)
        props = schema.get("properties")
        if isinstance(value, dict):
            for name in schema.get("required", []) or []:  # type: ignore[attr-defined]
                if name not in value:
                    self.error(child(path, str(name)), "required field is missing")
            if isinstance(props, dict):
                for key, sub in props.items():
                    if key in value and isinstance(sub, dict):
                        self.value_only(value[key], sub, child(path, key))
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                self.value_only(item, schema["items"], child(path, index))  # type: ignore[arg-type]

    # -- CEL --------------------------------------------------------------------------------------------
    def cel(self, value: object, schema: Mapping[str, object], path: str, old: object) -> None:
        rules = schema.get("x-kubernetes-validations")
        if not isinstance(rules, list):
            return
        for rule in rules:
            if not isinstance(rule, dict):
                continue
            text = str(rule.get("rule", ""))
            verdict = evaluate_cel(text, value, old)
            if verdict is None:
                verdict = evaluate_cel_full(text, value, old)
            if verdict is None:
                self.result.unevaluated.append(Issue(path, f"CEL rule not evaluated: {text}", self.source))
            elif verdict is False:
                message = rule.get("message") or f"failed rule: {text}"
                self.error(path, f"{message} (x-kubernetes-validations)")


def _map_key(item: object, keys: Sequence[str]) -> str:
    if not isinstance(item, dict):
        return json.dumps(item, sort_keys=True)
    return json.dumps([item.get(k) for k in keys], sort_keys=True)


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------- tiny CEL
_CompareOp = Callable[[float, float], bool]
_OPS: Final[dict[str, _CompareOp]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def evaluate_cel(rule: str, value: object, old: object = _MISSING) -> bool | None:
    """True / False for the few rule shapes understood here; None for every other rule (not evaluated).

    Understood: `self == oldSelf` (a transition rule: only on updates with an old value), `self <op> N`,
    `size(self) <op> N`, `!self.contains("s")`, `self.metadata.name.matches('re')`,
    `size(self.metadata.name) <op> N`, `!(has(self.a) && has(self.b))`, the Gateway API filter pairings
    `self.type == 'T' ? has(self.f) : true` / `has(self.f) ? self.type == 'T' : true` /
    `!(has(self.f) && self.type != 'T')` / `!(!has(self.f) && self.type == 'T')`, and the backendRef rule
    `(size(self.group) == 0 && self.kind == 'Service') ? has(self.port) : true`."""
    rule = " ".join(rule.split())
    obj = value if isinstance(value, dict) else {}
    if rule == "self == oldSelf":
        return True if old is _MISSING else _json_equal(value, old)
    if m := re.fullmatch(r"self (>=|<=|>|<|==|!=) (-?\d+(?:\.\d+)?)", rule):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _OPS[m[1]](float(value), float(m[2]))
        return None
    if m := re.fullmatch(r"size\(self\) (>=|<=|>|<|==|!=) (\d+)", rule):
        return _OPS[m[1]](len(value), int(m[2])) if isinstance(value, (str, list, dict)) else None
    if m := re.fullmatch(r'!self\.contains\("([^"]*)"\)', rule):
        return m[1] not in value if isinstance(value, str) else None
    if m := re.fullmatch(r"self\.metadata\.name\.matches\('([^']*)'\)", rule):
        name = _nested(value, "metadata", "name")
        return bool(re.search(m[1], name)) if isinstance(name, str) else None
    if m := re.fullmatch(r"size\(self\.metadata\.name\) (>=|<=|>|<|==|!=) (\d+)", rule):
        name = _nested(value, "metadata", "name")
        return _OPS[m[1]](len(name), int(m[2])) if isinstance(name, str) else None
    if not isinstance(value, dict):
        return None
    if m := re.fullmatch(r"!\(has\(self\.(\w+)\) && has\(self\.(\w+)\)\)", rule):
        return not (m[1] in obj and m[2] in obj)
    if m := re.fullmatch(r"self\.type == '(\w+)' \? has\(self\.(\w+)\) : true", rule):
        return obj.get("type") != m[1] or m[2] in obj
    if m := re.fullmatch(r"has\(self\.(\w+)\) \? self\.type == '(\w+)' : true", rule):
        return m[1] not in obj or obj.get("type") == m[2]
    if m := re.fullmatch(r"!\(has\(self\.(\w+)\) && self\.type != '(\w+)'\)", rule):
        return not (m[1] in obj and obj.get("type") != m[2])
    if m := re.fullmatch(r"!\(!has\(self\.(\w+)\) && self\.type == '(\w+)'\)", rule):
        return not (m[1] not in obj and obj.get("type") == m[2])
    if rule == "(size(self.group) == 0 && self.kind == 'Service') ? has(self.port) : true":
        group, kind = obj.get("group", ""), obj.get("kind", "Service")
        return not (group == "" and kind == "Service") or "port" in obj
    return None


@functools.cache
def _cel_program(rule: str) -> object:
    import celpy  # cel-python: a CEL interpreter (the language of x-kubernetes-validations)

    env = celpy.Environment()
    return env.program(env.compile(rule))


def evaluate_cel_full(rule: str, value: object, old: object = _MISSING) -> bool | None:
    """A rule the shapes of `evaluate_cel` do not cover, run by cel-python with `self` (and `oldSelf` on updates)
    bound as the API server binds them (k8s.io/apiextensions-apiserver pkg/apiserver/schema/cel: `self` is the value
    at the rule's path; a transition rule, one naming `oldSelf`, runs only when an old value exists). None when the
    rule uses something cel-python lacks (Kubernetes' own CEL libraries: quantity, url, ip, ...) or fails to run:
    then it stays listed as not evaluated."""
    import celpy

    uses_old = re.search(r"\boldSelf\b", rule) is not None
    if uses_old and old is _MISSING:
        return True  # not a transition: the API server skips the rule
    try:
        program = _cel_program(rule)
        activation = {"self": celpy.json_to_cel(value)}
        if uses_old:
            activation["oldSelf"] = celpy.json_to_cel(old)
        verdict = program.evaluate(activation)  # type: ignore[attr-defined]  # celpy.Runner
    except Exception:
        return None
    return bool(verdict) if isinstance(verdict, celpy.celtypes.BoolType) else None


def _nested(value: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# --------------------------------------------------------------------------------------------- core kinds
# Kinds without a CRD: validated through the kubernetes client's typed models (it ships no type stubs).
CORE_KINDS: Final[dict[tuple[str, str], tuple[str, str, bool]]] = {
    # (apiVersion, kind): (model, metadata.name rule, namespaced)
    ("v1", "ServiceAccount"): ("V1ServiceAccount", "subdomain", True),
    ("v1", "Secret"): ("V1Secret", "subdomain", True),
    ("v1", "ConfigMap"): ("V1ConfigMap", "subdomain", True),
    ("v1", "Service"): ("V1Service", "dns1035", True),  # core validation: ValidateServiceName
    ("v1", "Namespace"): ("V1Namespace", "label", False),
    ("apps/v1", "Deployment"): ("V1Deployment", "subdomain", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("V1Role", "path-segment", True),  # rbac ValidateRBACName
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("V1RoleBinding", "path-segment", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("V1ClusterRole", "path-segment", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("V1ClusterRoleBinding", "path-segment", False),
}
_NATIVE: Final[dict[str, tuple[type, ...]]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
_QUANTITY_MAPS: Final = frozenset({"limits", "requests", "capacity", "allocatable", "hard", "used", "overhead"})


@functools.lru_cache(maxsize=1)
def _kubernetes_models() -> ModuleType:
    return importlib.import_module("kubernetes.client")


def _model_class(name: str) -> type:
    klass = getattr(_kubernetes_models(), name, None)
    if not isinstance(klass, type):
        raise KeyError(f"no kubernetes client model named {name}")
    return klass


def _model_walk(data: object, type_name: str, path: str, issues: list[Issue], attr: str = "") -> object:
    """The typed model for `data` (as a generated OpenAPI client builds it), recording every field the model
    does not know (pruned by the server) and every required field its client-side validation finds missing."""
    if data is None:
        return None
    if type_name.startswith("list["):
        if not isinstance(data, list):
            issues.append(Issue(path, f"must be a list, got {_type_name(data)}", "core"))
            return None
        return [_model_walk(item, type_name[5:-1], child(path, i), issues, attr) for i, item in enumerate(data)]
    if type_name.startswith("dict("):
        match = re.fullmatch(r"dict\(([^,]*), (.*)\)", type_name)
        assert match is not None, type_name
        if not isinstance(data, dict):
            issues.append(Issue(path, f"must be a map, got {_type_name(data)}", "core"))
            return None
        return {k: _model_walk(v, match[2], child(path, str(k)), issues, attr) for k, v in data.items()}
    if type_name in _NATIVE:
        allowed = _NATIVE[type_name]
        if attr in _QUANTITY_MAPS and isinstance(data, (int, float)) and not isinstance(data, bool):
            return data  # resource quantities may be written as numbers
        if not isinstance(data, allowed) or (isinstance(data, bool) and bool not in allowed):
            issues.append(Issue(path, f"must be of type {type_name}, got {_type_name(data)} {_short(data)}", "core"))
        return data
    if type_name in ("object", "datetime", "date"):
        return data
    klass = _model_class(type_name)
    if not isinstance(data, dict):
        issues.append(Issue(path, f"must be an object ({type_name}), got {_type_name(data)}", "core"))
        return None
    openapi_types: dict[str, str] = getattr(klass, "openapi_types")  # noqa: B009
    attribute_map: dict[str, str] = getattr(klass, "attribute_map")  # noqa: B009
    by_key = {key: name for name, key in attribute_map.items()}
    kwargs: dict[str, object] = {}
    for key, value in data.items():
        if key not in by_key:
            issues.append(Issue(child(path, key), f"unknown field in {type_name}: the API server prunes it", "core"))
            continue
        name = by_key[key]
        kwargs[name] = _model_walk(value, openapi_types[name], child(path, key), issues, key)
        if openapi_types[name] == "V1ObjectMeta" and path:  # pod template / nested metadata
            issues += validate_object_meta(value, child(path, key), namespaced=True, name_rule=None, source="core")
    try:
        return klass(**kwargs)
    except ValueError as exc:  # client-side validation: "Invalid value for `x`, must not be `None`"
        match = re.search(r"`(\w+)`", str(exc))
        missing = attribute_map.get(match[1], match[1]) if match else "?"
        issues.append(Issue(child(path, missing), f"required field is missing ({type_name})", "core"))
        config = _kubernetes_models().Configuration()
        config.client_side_validation = False
        return klass(**kwargs, local_vars_configuration=config)


def validate_core(obj: Mapping[str, object], old: Mapping[str, object] | None = None) -> Result:
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    model, name_rule, namespaced = CORE_KINDS[key]
    issues = validate_object_meta(obj.get("metadata"), "metadata", namespaced=namespaced, name_rule=name_rule)
    body = {k: v for k, v in obj.items() if k != "metadata"}
    _model_walk(body, model, "", issues)
    issues += _core_rules(obj, old)
    return Result(errors=issues)


def _core_rules(obj: Mapping[str, object], old: Mapping[str, object] | None) -> list[Issue]:
    """A few server-side rules the models do not carry (k8s pkg/apis/{core,apps}/validation/validation.go)."""
    issues: list[Issue] = []
    kind = obj.get("kind")
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    if kind == "Deployment":
        selector = _nested(spec, "selector", "matchLabels")
        labels = _nested(spec, "template", "metadata", "labels")
        if isinstance(selector, dict):
            labels = labels if isinstance(labels, dict) else {}
            if any(labels.get(k) != v for k, v in selector.items()):
                issues.append(
                    Issue("spec.template.metadata.labels", "`selector` does not match template `labels`", "core")
                )
        if old is not None and _nested(old, "spec", "selector") != _nested(obj, "spec", "selector"):
            issues.append(Issue("spec.selector", "field is immutable (apps/v1 Deployment)", "core"))
        containers = _nested(spec, "template", "spec", "containers")
        for i, container in enumerate(containers if isinstance(containers, list) else []):
            cpath = f"spec.template.spec.containers[{i}]"
            if isinstance(container, dict):
                issues += _container_rules(container, cpath)
    if kind == "Service":
        ports = spec.get("ports")
        for i, port in enumerate(ports if isinstance(ports, list) else []):
            if isinstance(port, dict):
                number = port.get("port")
                if not isinstance(number, int) or not 1 <= number <= 65535:
                    issues.append(Issue(f"spec.ports[{i}].port", f"{number!r} must be between 1 and 65535", "core"))
        if isinstance(ports, list) and len(ports) > 1 and not all(isinstance(p, dict) and p.get("name") for p in ports):
            issues.append(Issue("spec.ports", "every port needs a name when there is more than one", "core"))
    if kind == "Secret":
        data = obj.get("data")
        for k, v in (data if isinstance(data, dict) else {}).items():
            try:
                base64.b64decode(str(v), validate=True)
            except (binascii.Error, ValueError):
                issues.append(Issue(child("data", str(k)), "must be base64", "core"))
        if old is not None and old.get("type", "Opaque") != obj.get("type", "Opaque"):
            issues.append(Issue("type", "field is immutable (Secret)", "core"))
    return issues


def _container_rules(container: Mapping[str, object], path: str) -> list[Issue]:
    issues: list[Issue] = []
    name = container.get("name")
    if isinstance(name, str):
        issues += [Issue(child(path, "name"), f"{name!r} {p}", "core") for p in name_problems(name, "label")]
    ports = container.get("ports")
    for i, port in enumerate(ports if isinstance(ports, list) else []):
        if not isinstance(port, dict):
            continue
        number = port.get("containerPort")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            issues.append(Issue(f"{path}.ports[{i}].containerPort", f"{number!r} must be 1..65535", "core"))
        port_name = port.get("name")
        if isinstance(port_name, str) and (len(port_name) > 15 or not IANA_SVC_NAME.match(port_name)):
            issues.append(Issue(f"{path}.ports[{i}].name", f"{port_name!r} is not an IANA service name", "core"))
    return issues


# --------------------------------------------------------------------------------------------- entry points
def validate(obj: Mapping[str, object], old: Mapping[str, object] | None = None, root: Path = PLATFORM) -> Result:
    """Everything the API server checks on a create (`old=None`) or an update of `obj` (before webhooks)."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return Result(errors=[Issue("", "apiVersion and kind are required strings")])
    if (api_version, kind) in CORE_KINDS:
        return validate_core(obj, old)
    crd = find_crd(api_version, kind, root)
    if crd is None:
        group, _ = split_api_version(api_version)
        known = sorted(f"{g}/{v} {k}" for g, v, k in load_platform(root) if g == group and k == kind)
        hint = f" (the platform serves {', '.join(known)})" if known else ""
        return Result(errors=[Issue("apiVersion", f"no CRD for {api_version} {kind} under {root}{hint}")])
    return validate_custom_resource(obj, crd, old)


def validate_custom_resource(
    obj: Mapping[str, object], crd: CrdVersion, old: Mapping[str, object] | None = None
) -> Result:
    result = Result()
    if not crd.served:
        result.errors.append(Issue("apiVersion", f"{crd.group}/{crd.version} is not served by the CRD"))
    result.errors += validate_object_meta(
        obj.get("metadata"), "metadata", namespaced=crd.namespaced, name_rule="subdomain"
    )
    if old is not None:
        old_meta = old.get("metadata") if isinstance(old.get("metadata"), dict) else {}
        new_meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        assert isinstance(old_meta, dict) and isinstance(new_meta, dict)
        for key in ("name", "namespace"):
            if old_meta.get(key) != new_meta.get(key):
                result.errors.append(Issue(child("metadata", key), "field is immutable", "metadata"))
    if "status" in obj and crd.has_status_subresource:
        result.errors.append(Issue("status", "status is written by the controller; the API server ignores it here"))
    schema = dict(crd.schema)
    props = dict(schema.get("properties") or {})  # type: ignore[call-overload]
    props.pop("metadata", None)  # validated above as ObjectMeta
    schema["properties"] = props
    # apiVersion, kind and metadata at the root are never pruned, whatever the schema lists (k8s.io/apiextensions-
    # apiserver pkg/apiserver/schema/pruning/algorithm.go: `isResourceRoot` skips them); Istio's CRDs list only
    # spec and status. apiVersion / kind were already matched to this CRD by `validate`.
    root = ("apiVersion", "kind", "metadata")
    body = {k: copy.deepcopy(v) for k, v in obj.items() if k not in root}
    walker = SchemaWalker()
    old_body: object = {k: v for k, v in old.items() if k not in root} if old is not None else _MISSING
    walker.walk(body, schema, "", old_body)
    result.extend(walker.result)
    return result


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` applies): null deletes a member, objects
    merge recursively, everything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged: dict[str, object] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


# --------------------------------------------------------------------------------------------- kustomize
def kustomizations(root: Path) -> list[Path]:
    """Every kustomization directory under `root` (found, not listed: a new overlay is picked up by itself).
    kustomize Components (`kind: Component`, mixins included by other kustomizations) are listed too."""
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def kustomization_kind(directory: Path) -> str:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    return str(data.get("kind", "Kustomization"))


def parent_kustomizations(directory: Path) -> list[Path]:
    """The kustomizations `directory` builds upon (its `resources:` entries that are kustomization directories):
    applying `directory` on a cluster that runs one of them UPDATES the objects the two share by kind and name.
    (`components:` are mixins, not parents.)"""
    data = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    parents: list[Path] = []
    for entry in data.get("resources", []) or []:
        candidate = (directory / str(entry)).resolve()
        if (candidate / "kustomization.yaml").is_file():
            parents.append(candidate)
    return parents


def render(directory: Path, kubectl: str = "kubectl") -> list[dict[str, object]]:
    """`kubectl kustomize <directory>` (offline), as a list of objects."""
    import subprocess

    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if isinstance(doc, dict)]


def identity(obj: Mapping[str, object]) -> tuple[str, str, str]:
    """(apiVersion group, kind, name): the key under which an apply finds the existing object."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    group, _ = split_api_version(str(obj.get("apiVersion", "")))
    return group, str(obj.get("kind")), str(name)
