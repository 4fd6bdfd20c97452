"""``keystone`` fetcher: the Keystone projects to rate (CloudKitty's default).

CloudKitty 25.0.0's ``KeystoneFetcher`` (cloudkitty/fetcher/keystone.py),
same options (``[fetcher_keystone]``) and the same scope list:

* every project of ``GET /v3/projects`` (Keystone's identity v3 API, found
  in the token's catalog: service type ``identity``, public interface, as
  keystoneclient does);
* without the disabled ones when ``ignore_disabled_tenants`` is set;
* unless ``ignore_rating_role`` is set, only the projects on which the
  authenticated user (the one of the credentials, ``session.get_user_id()``)
  has a role named ``rating`` granted directly (not through a group, not
  inherited from a domain, not implied by another role).

CloudKitty asks for the roles of the user project by project (``GET
/v3/projects/<id>/users/<user>/roles``: one request per project and pass).
This asks for the same grants at once: ``GET /v3/role_assignments?user.id=
<user>&include_names`` (direct assignments, project scopes without
``OS-INHERIT:inherited_to``, role name ``rating``), and falls back to
CloudKitty's requests, project by project, when Keystone's policy refuses
that listing (403) or truncates it (``list_limit``).

``keystone_version`` is kept for compatibility: 3 (``3``, ``v3``, ``3.x``)
only. Keystone's v2 API was removed in Keystone 13 (Queens); 2 is refused
with a configuration error.

Authentication: ``[fetcher_keystone]`` holds keystoneauth1's options or an
``auth_section`` naming the group that does (cloudkitty_proc/keystone_auth.py),
as in CloudKitty. The calls are blocking: the fetcher runs on the worker's
run thread between passes (never in the collect pool). Every error is a
FetchError of one line, credentials masked; the worker then keeps its last
scope list and retries (cloudkitty_proc/fetchers/base.py).
"""

from __future__ import annotations

import logging
import re
import urllib.parse

from oslo_config import cfg

from cloudkitty_proc import keystone_auth
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.fetchers.base import BaseFetcher, FetchError

LOG = logging.getLogger(__name__)

GROUP = "fetcher_keystone"
#: the role that marks a project to rate (CloudKitty's, fixed)
RATING_ROLE = "rating"
_IDENTITY = {"service_type": "identity", "interface": "public", "version": (3, 0)}

fetcher_keystone_opts = [
    cfg.StrOpt(
        "keystone_version",
        default="3",
        help="Keystone API version to use: 3 (Keystone's v2 API no longer exists).",
    ),
    cfg.BoolOpt(
        "ignore_rating_role",
        default=False,
        help="Rate every project, not only those on which the authenticated user "
        "has the rating role.",
    ),
    cfg.BoolOpt(
        "ignore_disabled_tenants",
        default=False,
        help="Do not rate the projects that are disabled in Keystone.",
    ),
]

OPTS = [(GROUP, [*fetcher_keystone_opts, *keystone_auth.group_opts()])]


def check_version(value: str) -> None:
    """ConfigError unless ``value`` names Keystone's v3 API."""
    match = re.fullmatch(r"[vV]?(\d+)(?:\.\d+)?", str(value).strip())
    major = int(match.group(1)) if match else None
    if major == 3:
        return
    if major == 2:
        raise ConfigError(f"[{GROUP}] keystone_version = {value}: Keystone's v2 API is not "
                          "supported (removed in Keystone 13, Queens); set 3")
    raise ConfigError(f"[{GROUP}] keystone_version = {value}: not a Keystone API version "
                      "this fetcher supports; set 3")


class KeystoneFetcher(BaseFetcher):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        group = conf[GROUP]
        check_version(group.keystone_version)
        self.ignore_rating_role = group.ignore_rating_role
        self.ignore_disabled = group.ignore_disabled_tenants
        self.ks = keystone_auth.KeystoneSession(conf, GROUP)
        self._warned: set[str] = set()

    # -- the scope list ---------------------------------------------------------
    def get_scopes(self) -> list[str]:
        try:
            projects = self._list("/projects", "projects")
            if self.ignore_disabled:
                projects = [p for p in projects if p.get("enabled", True)]
            ids = [str(p["id"]) for p in projects]
            if not self.ignore_rating_role and ids:
                rated = self.rated_projects(self.ks.session.get_user_id(), ids)
                ids = [i for i in ids if i in rated]
        except keystone_auth.KeystoneError as exc:
            raise FetchError(f"keystone fetcher ({self.ks.where} auth_type = "
                             f"{self.ks.auth_type}): {self.ks.describe(exc)}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise FetchError(f"keystone fetcher: malformed reply from Keystone "
                             f"({type(exc).__name__}: {exc})") from None
        LOG.debug("keystone fetcher: %d projects to rate", len(ids))
        return list(dict.fromkeys(ids))

    def rated_projects(self, user_id: str, project_ids: list[str]) -> set[str]:
        """The projects among ``project_ids`` on which ``user_id`` has the
        rating role directly: one listing of the user's role assignments,
        or (Keystone refuses or truncates it) CloudKitty's project by
        project requests."""
        try:
            assignments = self._list(
                "/role_assignments?" + urllib.parse.urlencode(
                    {"user.id": user_id, "include_names": "true"}),
                "role_assignments", exact=True)
        except keystone_auth.KeystoneError as exc:
            if getattr(exc, "http_status", None) != 403:
                raise
            self._warn_once("403", "listing role assignments is forbidden (%s): asking "
                            "for the roles project by project, as CloudKitty does",
                            self.ks.describe(exc))
            return self.rated_projects_one_by_one(user_id, project_ids)
        if assignments is None:
            return self.rated_projects_one_by_one(user_id, project_ids)
        wanted = set(project_ids)
        rated = set()
        for a in assignments:
            scope = a.get("scope") or {}
            project = scope.get("project")
            if (project and "OS-INHERIT:inherited_to" not in scope
                    and (a.get("role") or {}).get("name") == RATING_ROLE
                    and project.get("id") in wanted):
                rated.add(project["id"])
        return rated

    def rated_projects_one_by_one(self, user_id: str, project_ids: list[str]) -> set[str]:
        """CloudKitty's way: the user's roles on each project."""
        rated = set()
        user = urllib.parse.quote(user_id, safe="")
        for project_id in project_ids:
            roles = self._list(f"/projects/{urllib.parse.quote(project_id, safe='')}"
                               f"/users/{user}/roles", "roles")
            if any(r.get("name") == RATING_ROLE for r in roles):
                rated.add(project_id)
        return rated

    # -- requests ------------------------------------------------------------
    def _list(self, path: str, key: str, exact: bool = False) -> list[dict] | None:
        """The ``key`` list of ``GET <identity v3>/<path>``. A list Keystone
        truncated (its ``list_limit``): None when ``exact`` (the caller
        has another way), else the part given, with a warning."""
        body = self.ks.session.get(path, endpoint_filter=_IDENTITY).json()
        items = body[key]
        if not isinstance(items, list):
            raise TypeError(f"'{key}' is not a list")
        if body.get("truncated"):
            if exact:
                return None
            self._warn_once(path, "Keystone truncated GET %s to %d items (list_limit in "
                            "keystone.conf): the projects beyond are not rated", path,
                            len(items))
        return items

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            LOG.warning(msg, *args)

    def close(self) -> None:
        self.ks.close()
