"""The service's endpoints, one ``APIRouter`` per concern, each built by ``router(service)`` over the shared
:class:`~vlfuse.serving.service.Service` (its limits appear in the endpoints' signatures, so in the OpenAPI schema).
"""
