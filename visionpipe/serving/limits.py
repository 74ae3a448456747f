"""Defaults of the serving limits: every request's work is bounded before it is done.

Each is a flag of ``python -m visionpipe.serving.server`` (visionpipe/serving/server.py) and each refusal has a name:

=====================  =====================  ==========================================================
flag                   default                refusal
=====================  =====================  ==========================================================
--max_body_bytes       8 MiB                  REST 413 ``body_too_large``; gRPC RESOURCE_EXHAUSTED
--max_batch            64 images              400 ``batch_too_large`` (counted before any image is read)
--max_bytes            10 MiB per image       400 ``too_many_bytes``
--max_side             4096 px                400 ``image_too_large`` (from the header)
--max_pixels           4096 x 4096 per image  400 ``image_too_large`` (from the header)
--max_request_pixels   4 x 4096 x 4096        400 ``request_too_many_pixels`` (headers summed, before decoding)
--max_queue            64 requests            503 ``overloaded`` + Retry-After; gRPC UNAVAILABLE
=====================  =====================  ==========================================================

8 MiB is KServe's own gRPC message cap (kserve/constants/constants.py MAX_GRPC_MESSAGE_LENGTH), now applied to
REST too. This module imports nothing, so argument parsers can use it cheaply.
"""

from __future__ import annotations

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_SIDE = 4096
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_REQUEST_PIXELS = 4 * 4096 * 4096
DEFAULT_MAX_QUEUE = 64
