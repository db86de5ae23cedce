"""Drives blockrep's SDRS v1 API with the public OTC SDK (otcextensions), as a client would.

Run by tests/tests/rest_sdrs.rs in steps, each printing one JSON object on its last line:

    sdrs.py ENDPOINT PROJECT TOKEN STEP [ARGS...]

ENDPOINT is http://HOST:PORT; the SDK talks to ENDPOINT/v1/PROJECT with the token in
X-Auth-Token (keystoneauth's admin_token plugin: no Keystone). Every failed check raises.
"""

import json
import sys
import time

import openstack
from openstack import exceptions
from otcextensions import sdk as otc_sdk

JOB_WAIT_S = 300


def connect(endpoint, project, token):
    conn = openstack.connect(
        load_yaml_config=False,
        load_envvars=False,
        auth_type="admin_token",
        auth={"endpoint": f"{endpoint}/v1/{project}", "token": token},
    )
    otc_sdk.register_otc_extensions(conn)
    return conn


def wait_job(conn, job_id, want="SUCCESS"):
    """Polls a job as a client does until it ends; returns it."""
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        job = conn.sdrs.get_job(job_id)
        if job.status in ("SUCCESS", "FAIL"):
            assert job.status == want, f"job {job_id} ended {job.status}: {job.fail_reason}"
            for key in ("job_id", "job_type", "begin_time", "end_time"):
                assert getattr(job, key), f"job {job_id} has no {key}"
            return job
        assert job.status in ("INIT", "RUNNING"), job.status
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.2)


def raw_job(response):
    """The job id of an action the SDK answers raw (a requests.Response)."""
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()["job_id"]


def wait_group(conn, group_id, status):
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        group = conn.sdrs.get_protection_group(group_id)
        if group.status == status:
            return group
        assert time.monotonic() < deadline, f"group {group_id} is {group.status}, not {status}"
        time.sleep(0.2)


def refused(status, call, *args, **kwargs):
    """Asserts that a call is refused with HTTP `status`."""
    try:
        call(*args, **kwargs)
    except exceptions.HttpException as e:
        assert e.status_code == status, f"{call.__name__}: {e.status_code} {e}"
        return str(e)
    raise AssertionError(f"{call.__name__} was not refused")


def setup(conn, source, target, volumes):
    """Protection groups (three, paged through), one protecting `volumes` as pairs whose
    DR volumes a pool makes, protection started."""
    domains = list(conn.sdrs.get_domains())
    assert len(domains) == 1, domains
    domain = next(
        d for d in domains[0].domains
        if {d.local_replication_cluster.availability_zone,
            d.remote_replication_cluster.availability_zone} == {source, target}
    )
    groups = []
    for name in ("pg-a", "pg-b", "pg-c"):
        created = conn.sdrs.create_protection_group(
            name=name, description="blockrep test",
            source_availability_zone=source, target_availability_zone=target,
            domain_id=domain.id, source_vpc_id="vpc-1", dr_type="migration",
        )
        job = wait_job(conn, created.job_id)
        groups.append(job.entities.server_group_id)
    # Paging with limit walks every group by marker and stops at the empty page.
    paged = [g.id for g in conn.sdrs.protection_groups(limit=1)]
    assert sorted(paged) == sorted(groups), (paged, groups)
    found = conn.sdrs.find_protection_group("pg-b")
    assert found.id == groups[1], found
    assert conn.sdrs.find_protection_group("nothing-of-the-kind") is None
    group = conn.sdrs.get_protection_group(groups[0])
    assert group.status == "available" and group.priority_station == "source", group
    assert group.domain_id == domain.id
    renamed = conn.sdrs.update_protection_group(group, name="pg-main")
    assert renamed.name == "pg-main", renamed
    for g in groups[1:]:
        conn.sdrs.delete_protection_group(g)
    pairs = []
    for i, volume in enumerate(volumes):
        created = conn.sdrs.create_replication_pair(
            server_group_id=group.id, volume_id=volume, name=f"rep-{i}",
        )
        job = wait_job(conn, created.job_id)
        assert job.job_type == "createReplicationPair", job.job_type
        pairs.append(conn.sdrs.find_replication_pair(f"rep-{i}").id)
    listed = list(conn.sdrs.replication_pairs(server_group_id=group.id, limit=1))
    assert sorted(p.id for p in listed) == sorted(pairs), listed
    pair = conn.sdrs.get_replication_pair(pairs[0])
    assert pair.server_group_id == group.id and pair.volume_ids.startswith(volumes[0]), pair
    assert pair.record_metadata.volume_size >= 1
    assert conn.sdrs.update_replication_pair(pair, name="rep-0").name == "rep-0"
    wait_job(conn, raw_job(conn.sdrs.enable_protection(group.id)))
    wait_group(conn, group.id, "protected")
    quotas = list(conn.sdrs.quotas())[0]
    used = {r.type: r.used for r in quotas.resources}
    assert used == {"server_groups": 1, "replications": len(volumes)}, used
    return {
        "group": group.id,
        "pairs": pairs,
        "dr_volumes": [conn.sdrs.get_replication_pair(p).volume_ids.split(",")[1] for p in pairs],
    }


def refusals(conn, other, group, pair):
    """What SDRS refuses, and what blockrep does not serve, each with its status."""
    messages = {}
    messages["bad_domain"] = refused(
        400, conn.sdrs.create_protection_group, name="pg-x",
        source_availability_zone="az1", target_availability_zone="az2",
        domain_id="nope", source_vpc_id="vpc-1",
    )
    # Reverse to the site that is production already.
    messages["reverse_to_itself"] = refused(
        409, lambda: _checked_raw(conn.sdrs.perform_planned_failover(group, priority_station="source")))
    messages["delete_busy_group"] = refused(409, conn.sdrs.delete_protection_group, group)
    # Another project's token sees nothing of it.
    messages["other_project"] = refused(404, other.sdrs.get_protection_group, group)
    assert list(other.sdrs.protection_groups()) == []
    assert list(other.sdrs.replication_pairs()) == []
    refused(404, other.sdrs.get_replication_pair, pair)
    # Servers and NICs are not blockrep's; a hypermetro group keeps no points to drill.
    messages["instances"] = refused(501, lambda: list(conn.sdrs.protected_instances()))
    messages["drills"] = refused(
        409, conn.sdrs.create_dr_drill, name="drill-x", server_group_id=group,
        drill_vpc_id="vpc-drill")
    assert list(conn.sdrs.dr_drills()) == []
    return messages


def async_setup(conn, source, target, volume):
    """An async protection group protecting `volume` (its DR volume from a pool),
    protection started."""
    domain = list(conn.sdrs.get_domains())[0].domains[0]
    created = conn.sdrs.create_protection_group(
        name="pg-async", source_availability_zone=source, target_availability_zone=target,
        domain_id=domain.id, source_vpc_id="vpc-1", replication_model="async",
    )
    group = wait_job(conn, created.job_id).entities.server_group_id
    created = conn.sdrs.create_replication_pair(
        server_group_id=group, volume_id=volume, name="rep-app")
    wait_job(conn, created.job_id)
    pair = conn.sdrs.find_replication_pair("rep-app").id
    wait_job(conn, raw_job(conn.sdrs.enable_protection(group)))
    wait_group(conn, group, "protected")
    return {"group": group, "pair": pair}


def drills(conn, other, group):
    """A drill of the group through the SDK: made (its job done), found, listed, shown,
    renamed; another project sees none of it."""
    created = conn.sdrs.create_dr_drill(
        name="drill-a", server_group_id=group, drill_vpc_id="vpc-drill")
    job = wait_job(conn, created.job_id)
    assert job.job_type == "createDrDrill", job.job_type
    drill = conn.sdrs.find_dr_drill("drill-a")
    assert drill.server_group_id == group and drill.status == "available", drill
    assert drill.drill_vpc_id == "vpc-drill" and drill.drill_servers == [], drill
    listed = list(conn.sdrs.dr_drills(server_group_id=group, limit=1))
    assert [d.id for d in listed] == [drill.id], listed
    assert conn.sdrs.get_dr_drill(drill.id).name == "drill-a"
    assert conn.sdrs.get_protection_group(group).disaster_recovery_drill_num == 1
    refused(404, other.sdrs.get_dr_drill, drill.id)
    assert list(other.sdrs.dr_drills()) == []
    refused(409, conn.sdrs.create_dr_drill, name="drill-a", server_group_id=group)
    return {"drill": drill.id}


def drill_done(conn, drill):
    """The drill renamed, then deleted (its job done)."""
    renamed = conn.sdrs.update_dr_drill(drill, name="drill-b")
    assert renamed.name == "drill-b", renamed
    # The SDK drops the delete's answer (its job is done by the time it answers).
    conn.sdrs.delete_dr_drill(drill)
    assert list(conn.sdrs.dr_drills()) == []
    return {"deleted": True}


def _checked_raw(response):
    """Raises the HttpException a raw action's refusal stands for."""
    if response.status_code >= 400:
        raise exceptions.HttpException(
            message=response.text, response=response, http_status=response.status_code)
    return response


def act(conn, group, action):
    """One protection group action through the SDK, waited for."""
    if action == "failover":
        wait_job(conn, raw_job(conn.sdrs.perform_failover(group)))
        return {"status": wait_group(conn, group, "failed-over").status}
    if action == "reprotect":
        wait_job(conn, raw_job(conn.sdrs.enable_protection(group)))
        g = wait_group(conn, group, "protected")
        return {"status": g.status, "priority_station": g.priority_station}
    if action.startswith("reverse-to-"):
        station = action.removeprefix("reverse-to-")
        wait_job(conn, raw_job(conn.sdrs.perform_planned_failover(group, priority_station=station)))
        g = wait_group(conn, group, "protected")
        assert g.priority_station == station, g
        return {"status": g.status, "priority_station": g.priority_station}
    if action == "stop":
        wait_job(conn, raw_job(conn.sdrs.disable_protection(group)))
        return {"status": wait_group(conn, group, "available").status}
    raise AssertionError(f"unknown action {action}")


def extend(conn, pair, gib):
    job = raw_job(conn.sdrs.expand_replication_pair(pair, gib))
    wait_job(conn, job)
    size = conn.sdrs.get_replication_pair(pair).record_metadata.volume_size
    assert size == gib, size
    return {"volume_size": size}


def teardown(conn, group, pairs):
    """Pairs deleted with their DR volumes, then the group."""
    for pair in pairs:
        deleted = conn.sdrs.delete_replication_pair(pair, delete_target_volume=True)
        wait_job(conn, deleted.job_id)
    assert list(conn.sdrs.replication_pairs(server_group_id=group)) == []
    conn.sdrs.delete_protection_group(group)
    assert conn.sdrs.find_protection_group(group) is None
    return {"deleted": True}


def main():
    endpoint, project, token, step, *args = sys.argv[1:]
    conn = connect(endpoint, project, token)
    if step == "setup":
        source, target, *volumes = args
        out = setup(conn, source, target, volumes)
    elif step == "refusals":
        other_project, other_token, group, pair = args
        out = refusals(conn, connect(endpoint, other_project, other_token), group, pair)
    elif step == "async_setup":
        source, target, volume = args
        out = async_setup(conn, source, target, volume)
    elif step == "drills":
        other_project, other_token, group = args
        out = drills(conn, connect(endpoint, other_project, other_token), group)
    elif step == "drill_done":
        (drill,) = args
        out = drill_done(conn, drill)
    elif step == "act":
        group, action = args
        out = act(conn, group, action)
    elif step == "extend":
        pair, gib = args
        out = extend(conn, pair, int(gib))
    elif step == "teardown":
        group, *pairs = args
        out = teardown(conn, group, pairs)
    else:
        raise AssertionError(f"unknown step {step}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
