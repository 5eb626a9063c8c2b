"""HPC-side config: validation errors name the option and the reason."""

import os
from pathlib import Path

import pytest
import tomllib

from node_agent import hpc_config as hc

REPO = Path(__file__).resolve().parent.parent
IMG = {"container": {"image": "/opt/images/compute.sif"}}


def errors_of(data):
    with pytest.raises(hc.HpcConfigError) as ei:
        hc.config_from_dict(data)
    return ei.value


def test_defaults_with_image_are_valid():
    c = hc.config_from_dict(IMG)
    assert c.container.contain == "contain-pid"
    assert c.overlay.size_bytes == 2 << 30
    assert c.storage.scratch_dir == os.path.expanduser("~/jupyterhub-hpc")
    assert c.container.inner_command == ["node-agent", "run"]
    assert c.maintenance.enabled is False


def test_no_container_mode_needs_no_image():
    c = hc.config_from_dict({"container": {"enabled": False}})
    assert not c.container.enabled


def test_container_needs_image():
    e = errors_of({})
    assert e.errors[0][0] == "container.image"
    assert "required when container.enabled is true" in str(e)


def test_overlay_size_message_exact():
    e = errors_of({**IMG, "overlay": {"size": "big"}})
    assert str(e) == "hpc config error: overlay.size: must be like '2G' or '512M', got 'big'"


@pytest.mark.parametrize(
    "data, option, reason",
    [
        ({"maintenance": {"enabled": "yes"}}, "maintenance.enabled", "must be true or false"),
        ({"maintenance": {"allowed_users": "alice"}}, "maintenance.allowed_users", "must be a list of strings"),
        ({"overlay": {"size": "1K"}}, "overlay.size", "at least 4M"),
        ({"overlay": {"lock_timeout": 0}}, "overlay.lock_timeout", "must be >= 1"),
        ({"overlay": {"lock_timeout": True}}, "overlay.lock_timeout", "must be an integer"),
        ({"overlay": {"check": "full"}}, "overlay.check", "must be one of"),
        ({"overlay": {"location": "relative/{user}.img"}}, "overlay.location", "absolute path"),
        ({"overlay": {"location": "/x/{username}.img"}}, "overlay.location", "unknown placeholder {username}"),
        ({"overlay": {"location": "/x/{user!r}.img"}}, "overlay.location", "format spec"),
        ({"storage": {"home_root": "/x/{home}"}}, "storage.home_root", "unknown placeholder {home}"),
        ({"storage": {"home_mode": "rwx"}}, "storage.home_mode", "octal mode"),
        (
            {"storage": {"scratch_dir": "$NO_SUCH_VAR_HOPEFULLY/x"}},
            "storage.scratch_dir",
            "$NO_SUCH_VAR_HOPEFULLY is not set",
        ),
        ({"container": {"contain": "containal"}}, "container.contain", "did you mean 'containall'"),
        ({"container": {"binds": ["/data:/data:rx"]}}, "container.binds", "'ro' or 'rw'"),
        ({"container": {"binds": ["/a,/b"]}}, "container.binds", "one bind per list item"),
        ({"container": {"extra_binds": ["data:/data"]}}, "container.extra_binds", "absolute path"),
        ({"container": {"home": "home"}}, "container.home", "absolute path"),
        ({"container": {"runtime": "my apptainer"}}, "container.runtime", "program name"),
        ({"container": {"gpu_flag": "nv"}}, "container.gpu_flag", "runtime flag"),
        ({"container": {"no_mount": ["tmp,cwd"]}}, "container.no_mount", "without ','"),
        ({"container": {"image": "images/x.sif"}}, "container.image", "absolute path"),
        ({"webdav": {"enabled": True}}, "webdav.mount_command", "required when webdav.enabled"),
        ({"webdav": {"enabled": True, "mount_command": ["mount", "{url}"]}}, "webdav.mount_command", "{mount_point}"),
        ({"webdav": {"mount_command": ["m", "{password}"]}}, "webdav.mount_command", "unknown placeholder {password}"),
        (
            {"webdav": {"enabled": True, "mount_command": ["m", "{mount_point}"], "url": "ftp://x.org/"}},
            "webdav.url",
            "https or http",
        ),
        ({"webdav": {"unmount_command": ["umount", "{url}"]}}, "webdav.unmount_command", "unknown placeholder {url}"),
        (
            {
                "webdav": {
                    "enabled": True,
                    "mount_command": ["m", "{mount_point}"],
                    "unmount_command": ["{home}/umount", "{mount_point}"],
                }
            },
            "webdav.unmount_command",
            "item 0 (the program) must not contain a placeholder",
        ),
        ({"webdav": {"unmount_command": "umount"}}, "webdav.unmount_command", "list of strings"),
        (
            {"webdav": {"credential_env": {"RCLONE PASS": "X"}}},
            "webdav.credential_env",
            "not a valid environment variable name",
        ),
        ({"logging": {"debug": 1}}, "logging.debug", "must be true or false"),
        ({"nbgrader": {"exchange_dir": "srv/ex"}}, "nbgrader.exchange_dir", "absolute path"),
    ],
)
def test_bad_values_name_option_and_reason(data, option, reason):
    merged = {**IMG, **data}
    if "container" in data:
        merged["container"] = {**IMG["container"], **data["container"]}
    e = errors_of(merged)
    assert [o for o, _ in e.errors] == [option], str(e)
    assert reason in str(e)
    assert str(e).startswith(f"hpc config error: {option}: ")


def test_several_errors_reported_at_once():
    e = errors_of({**IMG, "overlay": {"size": "big", "create": "no"}, "logging": {"per_day": "x"}})
    assert {o for o, _ in e.errors} == {"overlay.size", "overlay.create", "logging.per_day"}


def test_unknown_option_did_you_mean():
    e = errors_of({**IMG, "overlay": {"sise": "2G"}})
    assert str(e) == ("hpc config error: overlay.sise: unknown option (did you mean 'overlay.size'?)")


def test_unknown_section_and_top_level_option():
    e = errors_of({**IMG, "overlays": {}, "debug": True})
    msg = str(e)
    assert "overlays: unknown section (did you mean 'overlay'?)" in msg
    assert "debug: unknown option at top level (did you mean 'logging.debug'?)" in msg


def test_bad_toml_names_file(tmp_path):
    p = tmp_path / "hpc.toml"
    p.write_text("[overlay]\nsize = 2G\n")
    with pytest.raises(hc.HpcConfigError) as ei:
        hc.load_config(p)
    assert str(p) in str(ei.value) and "not valid TOML" in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(hc.HpcConfigError, match="file not found"):
        hc.load_config(tmp_path / "nope.toml")


def test_file_errors_mention_source(tmp_path):
    p = tmp_path / "hpc.toml"
    p.write_text('[container]\nimage = "/x.sif"\n[overlay]\nsize = "big"\n')
    with pytest.raises(hc.HpcConfigError) as ei:
        hc.load_config(p)
    assert str(ei.value) == (f"hpc config error ({p}): overlay.size: must be like '2G' or '512M', got 'big'")


def test_user_paths_and_templates(tmp_path):
    c = hc.config_from_dict(
        {
            "storage": {"scratch_dir": str(tmp_path), "home_root": "{scratch_dir}/h"},
            "overlay": {"location": "{home}/.overlay.img"},
            "logging": {"dir": "{scratch_dir}/log/{user}"},
            "container": {"image": "/x.sif", "home": "/home/u"},
        }
    )
    p = c.user_paths("Ann Lee")
    assert p.safe_user == "Ann_20Lee"
    assert p.home == f"{tmp_path}/h/Ann_20Lee"
    assert p.overlay == f"{tmp_path}/h/Ann_20Lee/.overlay.img"
    assert p.log_dir == f"{tmp_path}/log/Ann_20Lee"
    assert p.container_webdav_mount_point == "/home/u/WebDAV"


def test_template_values_are_inserted_literally(tmp_path):
    c = hc.config_from_dict({"storage": {"scratch_dir": str(tmp_path)}, **IMG})
    # a user name that looks like a template must not be re-expanded
    p = c.user_paths("{scratch_dir}")
    assert p.safe_user == "_7bscratch_5fdir_7d"
    assert p.home.startswith(str(tmp_path))


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a..b", "x\x00y", "a\nb", "\\x", "u" * 200])
def test_bad_usernames_rejected(bad):
    with pytest.raises(hc.UserNameError):
        hc.safe_username(bad)


@pytest.mark.parametrize(
    "name, safe",
    [
        ("alice", "alice"),
        ("a.b-c", "a.b-c"),
        ("a_b", "a_5fb"),
        (".hidden", "_2ehidden"),
        ("-rf", "_2drf"),
        ("jürgen", "j_c3_bcrgen"),
        ("x@y.org", "x_40y.org"),
        ("a:b", "a_3ab"),
    ],
)
def test_username_mapping(name, safe):
    assert hc.safe_username(name) == safe


def test_username_mapping_is_one_to_one():
    names = ["a_b", "a b", "a_20b", "a__b", "a_5fb"]
    assert len({hc.safe_username(n) for n in names}) == len(names)


def test_maintenance_allow_list_patterns():
    c = hc.config_from_dict({**IMG, "maintenance": {"enabled": True, "allowed_users": ["root", "admin-*"]}})
    assert c.is_maintenance_blocked("alice")
    assert c.is_maintenance_blocked("")
    assert not c.is_maintenance_blocked("admin-bob")
    assert not c.is_maintenance_blocked("root")


def test_dump_toml_round_trip():
    data = {
        "container": {"image": '/a "b"\\.sif', "binds": ["/x:/y:ro"], "enabled": True},
        "webdav": {"credential_env": {"RCLONE_WEBDAV_PASS": "NODE_AGENT_WEBDAV_PASSWORD"}},
        "overlay": {"lock_timeout": 5},
    }
    text = hc.dump_toml(data, header="# hi")
    assert tomllib.loads(text) == data
    hc.config_from_dict(tomllib.loads(text))


def test_example_file_validates():
    c = hc.load_config(REPO / "examples" / "hpc-config.toml")
    assert c.container.enabled


def test_docs_table_lists_every_option():
    text = (REPO / "docs" / "hpc-config.md").read_text()
    missing = [o.key for o in hc.SCHEMA if f"`{o.key}`" not in text]
    assert not missing, f"docs/hpc-config.md lacks {missing}"
    assert hc.render_docs_table() in text, "docs table out of date: regenerate it"


def test_example_mentions_every_section():
    data = tomllib.loads((REPO / "examples" / "hpc-config.toml").read_text())
    assert set(data) == set(hc.SECTIONS)
