"""Protectables of the SIMULATED cloud: who depends on what (Karbor's protectable plugins).

The hierarchy follows Karbor's: a project has servers, networks and any volume
or image no server uses; a server depends on its attached volumes and its
image. Listing dependents costs the profile's ``api`` latency (zero by default).
"""

from __future__ import annotations

from collections.abc import Iterable

from karbor_simcloud._cloud import IMAGE, NETWORK, PROJECT, SERVER, VOLUME, SimCloud
from karbor_simcloud._compat import Protectable, Resource
from karbor_simcloud._config import current_cloud

__all__ = [
    "ImageProtectable",
    "NetworkProtectable",
    "ProjectProtectable",
    "ServerProtectable",
    "VolumeProtectable",
    "all_protectables",
]


class _SimProtectable:
    # Plain class attributes (not ClassVar): the Protectable protocol declares them as
    # attributes, and each subclass sets them once.
    resource_type: str
    parent_types: tuple[str, ...]

    def __init__(self, cloud: SimCloud | None = None) -> None:
        self._cloud = cloud

    @property
    def cloud(self) -> SimCloud:
        return self._cloud if self._cloud is not None else current_cloud()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (simulated cloud) of {self.resource_type}>"

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        cloud = self.cloud
        await cloud.delay(cloud.latency.api)
        return [cloud.resource_of(self.resource_type, rid) for rid in self._ids(cloud, parent)]

    def _ids(self, cloud: SimCloud, parent: Resource) -> Iterable[str]:
        raise NotImplementedError


class ProjectProtectable(_SimProtectable):
    """Projects are roots: nothing lists them as dependents."""

    resource_type: str = PROJECT
    parent_types: tuple[str, ...] = ()

    def _ids(self, cloud: SimCloud, parent: Resource) -> Iterable[str]:
        return ()


class ServerProtectable(_SimProtectable):
    """The servers of a project."""

    resource_type: str = SERVER
    parent_types: tuple[str, ...] = (PROJECT,)

    def _ids(self, cloud: SimCloud, parent: Resource) -> Iterable[str]:
        return [s.id for s in cloud.servers.values() if s.project_id == parent.id]


class NetworkProtectable(_SimProtectable):
    """The networks of a project."""

    resource_type: str = NETWORK
    parent_types: tuple[str, ...] = (PROJECT,)

    def _ids(self, cloud: SimCloud, parent: Resource) -> Iterable[str]:
        return [n.id for n in cloud.networks.values() if n.project_id == parent.id]


class VolumeProtectable(_SimProtectable):
    """A server's attached volumes; a project's volumes that no server uses."""

    resource_type: str = VOLUME
    parent_types: tuple[str, ...] = (SERVER, PROJECT)

    def _ids(self, cloud: SimCloud, parent: Resource) -> Iterable[str]:
        if parent.type == SERVER:
            return list(cloud.server(parent.id).volume_ids)
        return [
            v.id for v in cloud.volumes.values() if v.project_id == parent.id and not v.attached_to
        ]


class ImageProtectable(_SimProtectable):
    """A server's image; a project's images that no server uses."""

    resource_type: str = IMAGE
    parent_types: tuple[str, ...] = (SERVER, PROJECT)

    def _ids(self, cloud: SimCloud, parent: Resource) -> Iterable[str]:
        if parent.type == SERVER:
            return [cloud.server(parent.id).image_id]
        used = {s.image_id for s in cloud.servers.values()}
        return [
            i.id for i in cloud.images.values() if i.project_id == parent.id and i.id not in used
        ]


def all_protectables(cloud: SimCloud | None = None) -> list[Protectable]:
    """One protectable per simulated type, bound to ``cloud`` (or resolved at call time)."""
    return [
        ProjectProtectable(cloud),
        ServerProtectable(cloud),
        NetworkProtectable(cloud),
        VolumeProtectable(cloud),
        ImageProtectable(cloud),
    ]
