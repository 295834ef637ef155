"""SPEC §14: the defaults, a TOML file, the environment (`OPD_` + name) winning over it, and clear refusals."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import pytest

from opd_grpc.settings import Settings, SettingsError

pytestmark = pytest.mark.backend_independent
README = Path(__file__).parents[2] / "README.md"


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "opd.toml"
    path.write_text(text)
    return path


def test_the_readme_settings_table_has_every_setting_with_its_default():
    """An operator sets the server up from that table: a setting missing there, or a default it misstates, is a
    server that does not do what its settings file seems to say."""
    table = README.read_text().split("| setting | default | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for row in table.splitlines()[2:]:
        names, default = row.strip("|").split("|")[:2]
        for name in re.findall(r"`([A-Z_]+)`", names):
            documented[name] = default.strip().strip("`")
    assert documented == {field.name: _as_in_readme(field.default) for field in dataclasses.fields(Settings)}


def _as_in_readme(default: object) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return f"{default:g}"
    return str(default) or "(none)"


def test_the_defaults_are_the_specs():
    settings = Settings.load(env={})
    assert (settings.DEFAULT_SLOT_CAPACITY, settings.AVERAGE_CONSULTATION_MINUTES,
            settings.NO_SHOW_GRACE_PERIOD_MINUTES, settings.MAX_WAITLIST_SIZE) == (10, 5, 15, 50)
    assert (settings.AUTO_NO_SHOW, settings.RATE_LIMIT_PER_KEY, settings.MAX_CONCURRENT_CALLS) == (False, 0, 1000)
    assert (settings.TIMEZONE, settings.LISTEN) == ("UTC", "127.0.0.1:50051")
    assert settings.DATABASE_URL.startswith("sqlite:///") and not settings.DATABASE_URL.startswith("sqlite:////")
    assert settings.TEST_CLOCK is False


def test_a_toml_file_sets_any_setting(tmp_path):
    path = toml(tmp_path, """
DEFAULT_SLOT_CAPACITY = 12
average_consultation_minutes = 7
NO_SHOW_GRACE_PERIOD_MINUTES = 20
MAX_WAITLIST_SIZE = 5
AUTO_NO_SHOW = true
TIMEZONE = "Asia/Kolkata"
DATABASE_URL = "sqlite:////var/lib/opd/opd.db"
LISTEN = "0.0.0.0:6000"
""")
    settings = Settings.load(env={}, file=path)
    assert (settings.DEFAULT_SLOT_CAPACITY, settings.AVERAGE_CONSULTATION_MINUTES,
            settings.NO_SHOW_GRACE_PERIOD_MINUTES, settings.MAX_WAITLIST_SIZE) == (12, 7, 20, 5)
    assert settings.AUTO_NO_SHOW is True
    assert (settings.TIMEZONE, settings.DATABASE_URL, settings.LISTEN) == (
        "Asia/Kolkata", "sqlite:////var/lib/opd/opd.db", "0.0.0.0:6000")
    rules = settings.rules()
    assert (rules.default_slot_capacity, rules.average_consultation_minutes,
            rules.no_show_grace_period_minutes, rules.max_waitlist_size) == (12, 7, 20, 5)
    assert dt.datetime(2030, 1, 7, 9, tzinfo=rules.timezone).utcoffset() == dt.timedelta(hours=5, minutes=30)


def test_opd_config_names_the_file(tmp_path):
    path = toml(tmp_path, "MAX_WAITLIST_SIZE = 3\n")
    assert Settings.load(env={"OPD_CONFIG": str(path)}).MAX_WAITLIST_SIZE == 3


def test_the_environment_wins_over_the_file(tmp_path):
    path = toml(tmp_path, 'DEFAULT_SLOT_CAPACITY = 12\nLISTEN = "0.0.0.0:6000"\nAUTO_NO_SHOW = true\n')
    env = {"OPD_DEFAULT_SLOT_CAPACITY": "4", "OPD_AUTO_NO_SHOW": "false",
           "OPD_DATABASE_URL": "postgresql+psycopg://opd@db/opd", "OPD_TIMEZONE": "Europe/London"}
    settings = Settings.load(env=env, file=path)
    assert settings.DEFAULT_SLOT_CAPACITY == 4
    assert settings.AUTO_NO_SHOW is False
    assert settings.LISTEN == "0.0.0.0:6000"  # only in the file
    assert (settings.DATABASE_URL, settings.TIMEZONE) == ("postgresql+psycopg://opd@db/opd", "Europe/London")


@pytest.mark.parametrize("text", ["true", "1", "yes", "on", "TRUE"])
def test_true_in_the_environment(text):
    assert Settings.load(env={"OPD_AUTO_NO_SHOW": text}).AUTO_NO_SHOW is True


@pytest.mark.parametrize("env,named", [
    ({"OPD_DEFAULT_SLOT_CAPACITY": "ten"}, "DEFAULT_SLOT_CAPACITY"),
    ({"OPD_MAX_WAITLIST_SIZE": "2.5"}, "MAX_WAITLIST_SIZE"),
    ({"OPD_NO_SHOW_GRACE_PERIOD_MINUTES": ""}, "NO_SHOW_GRACE_PERIOD_MINUTES"),
    ({"OPD_AUTO_NO_SHOW": "maybe"}, "AUTO_NO_SHOW"),
    ({"OPD_TIMEZONE": "Mars/Olympus_Mons"}, "TIMEZONE"),
    ({"OPD_TIMEZONE": "IST+5:30"}, "TIMEZONE"),
    ({"OPD_DEFAULT_SLOT_CAPACITY": "0"}, "DEFAULT_SLOT_CAPACITY"),
    ({"OPD_AVERAGE_CONSULTATION_MINUTES": "-5"}, "AVERAGE_CONSULTATION_MINUTES"),
    ({"OPD_MAX_WAITLIST_SIZE": "-1"}, "MAX_WAITLIST_SIZE"),
    ({"OPD_WATCH_HEARTBEAT_SECONDS": "nan"}, "WATCH_HEARTBEAT_SECONDS"),
    ({"OPD_SHUTDOWN_GRACE_SECONDS": "inf"}, "SHUTDOWN_GRACE_SECONDS"),
    ({"OPD_DEFAULT_SLOT_CAPACITY": "2000000"}, "DEFAULT_SLOT_CAPACITY"),
    ({"OPD_AVERAGE_CONSULTATION_MINUTES": "5000"}, "AVERAGE_CONSULTATION_MINUTES"),
    ({"OPD_DEFAULT_SLOT_CAPACITY": "1000000", "OPD_AVERAGE_CONSULTATION_MINUTES": "60"}, "x AVERAGE_CONSULTATION"),
    # gRPC would serve on 52237 (117773 modulo 65536), on 443, or nowhere the operator meant
    ({"OPD_LISTEN": "127.0.0.1:117773"}, "LISTEN must be HOST:PORT"),
    ({"OPD_LISTEN": "127.0.0.1"}, "LISTEN must be HOST:PORT"),
    ({"OPD_LISTEN": "nonsense"}, "LISTEN must be HOST:PORT"),
    ({"OPD_LISTEN": "::1"}, "LISTEN must be HOST:PORT"),
    ({"OPD_METRICS_LISTEN": "garbage"}, "METRICS_LISTEN must be HOST:PORT"),
    ({"OPD_DATABASE_URL": "mysql://root@localhost/opd"}, "DATABASE_URL: mysql:// is not a database"),
    ({"OPD_MAX_MESSAGE_BYTES": "1"}, "MAX_MESSAGE_BYTES must be at least 4096"),
    ({"OPD_DATABASE_URL": " "}, "DATABASE_URL is empty: leave it out for the default"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_a_bad_value_in_the_environment_is_refused_by_name(env, named):
    with pytest.raises(SettingsError) as refusal:
        Settings.load(env=env)
    assert named in str(refusal.value)


def test_postgresql_without_a_driver_means_the_psycopg_this_project_installs():
    """SQLAlchemy reads postgresql:// as psycopg2, which is not installed: the server would die with a traceback."""
    settings = Settings.load(env={"OPD_DATABASE_URL": "postgresql://postgres:p%40ss@db.example:5432/opd"})
    assert settings.DATABASE_URL == "postgresql+psycopg://postgres:p%40ss@db.example:5432/opd"
    assert Settings.load(env={"OPD_DATABASE_URL": "postgres://db.example/opd"}).DATABASE_URL == \
        "postgresql+psycopg://db.example/opd"


@pytest.mark.parametrize("text,named", [
    ('DEFAULT_SLOT_CAPACITY = "ten"', "DEFAULT_SLOT_CAPACITY"),
    ("DEFAULT_SLOT_CAPACITY = 2.5", "DEFAULT_SLOT_CAPACITY"),
    ("MAX_WAITLIST_SIZE = true", "MAX_WAITLIST_SIZE"),
    ('TIMEZONE = "Asia/Bangalore"', "TIMEZONE"),
    ("MAX_WAITLST_SIZE = 5", "MAX_WAITLST_SIZE"),
    ("DEFAULT_SLOT_CAPACITY = ", "opd.toml"),
])
def test_a_bad_file_is_refused_by_name(tmp_path, text, named):
    with pytest.raises(SettingsError) as refusal:
        Settings.load(env={}, file=toml(tmp_path, text + "\n"))
    assert named in str(refusal.value)


def test_a_misspelt_setting_is_refused_with_the_name_it_is_near(tmp_path):
    """OPD_AUTO_NOSHOW=1 left auto no-show off without a word. Other OPD_ names are others' and let be: what the
    clients read, and what Kubernetes sets for a Service named opd or opd-grpc in the pod's namespace (a reviewer
    found the first version of this check refusing them, so a replica would not have restarted)."""
    with pytest.raises(SettingsError, match=r"^unknown settings in the environment: OPD_AUTO_NOSHOW \(did you mean "
                                            r"OPD_AUTO_NO_SHOW\?\), OPD_DATABSE_URL \(did you mean "
                                            r"OPD_DATABASE_URL\?\)$"):
        Settings.load(env={"OPD_AUTO_NOSHOW": "1", "OPD_DATABSE_URL": "x", "OPD_MAX_WAITLIST_SIZE": "5"})
    with pytest.raises(SettingsError, match=r"OPD_auto_no_show \(did you mean OPD_AUTO_NO_SHOW\?\)"):
        Settings.load(env={"OPD_auto_no_show": "1"})  # names in the environment are in capitals
    others = {"OPD_ADDRESS": "opd:50051", "OPD_API_KEY": "opd_x_y", "OPD_CA_CERT": "ca.pem",
              "OPD_CLIENT_CERT": "c.pem", "OPD_CLIENT_KEY": "k.pem", "OPD_CONFIG": "",
              "OPD_SERVICE_HOST": "10.0.0.7", "OPD_SERVICE_PORT": "50051", "OPD_PORT": "tcp://10.0.0.7:50051",
              "OPD_PORT_50051_TCP_ADDR": "10.0.0.7", "OPD_GRPC_SERVICE_HOST": "10.0.0.8", "OPD_GRPC_PORT": "tcp://x",
              "OPD_DATABASE_PORT": "tcp://10.0.0.9:5432", "OPD_DATABASE_SERVICE_PORT_POSTGRES": "5432"}
    assert Settings.load(env={**others, "OPD_AUTO_NO_SHOW": "1"}).AUTO_NO_SHOW
    with pytest.raises(SettingsError, match=r"MAX_WAITLST_SIZE \(did you mean MAX_WAITLIST_SIZE\?\)"):
        Settings.load(env={}, file=toml(tmp_path, "MAX_WAITLST_SIZE = 5\n"))


def test_a_file_in_utf16_or_with_one_name_twice_is_refused_and_a_byte_order_mark_is_read(tmp_path):
    """Notepad's "Unicode" (UTF-16) had stopped the server with a UnicodeDecodeError traceback; UTF-8 with a BOM
    was refused as invalid TOML; and MAX_WAITLIST_SIZE beside max_waitlist_size left one of them unsaid."""
    path = tmp_path / "opd.toml"
    path.write_bytes("MAX_WAITLIST_SIZE = 30\n".encode("utf-16"))
    with pytest.raises(SettingsError, match=r"it is not UTF-8 text \(byte 0\); save it as UTF-8$"):
        Settings.load(env={}, file=path)
    path.write_bytes("MAX_WAITLIST_SIZE = 30\n".encode("utf-16-le"))  # without its byte-order mark
    with pytest.raises(SettingsError, match=r"it is not UTF-8 text \(byte 1\); save it as UTF-8$"):
        Settings.load(env={}, file=path)
    path.write_bytes("MAX_WAITLIST_SIZE = 30\n".encode("utf-8-sig"))
    assert Settings.load(env={}, file=path).MAX_WAITLIST_SIZE == 30
    with pytest.raises(SettingsError, match="sets MAX_WAITLIST_SIZE twice"):
        Settings.load(env={}, file=toml(tmp_path, "MAX_WAITLIST_SIZE = 30\nmax_waitlist_size = 40\n"))


def test_a_missing_file_is_refused_by_name(tmp_path):
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(SettingsError) as refusal:
        Settings.load(env={"OPD_CONFIG": str(missing)})
    assert str(missing) in str(refusal.value)


def test_history_is_kept_30_days_and_answers_48_hours_and_never_less_than_spec_9s_day():
    settings = Settings.load(env={})
    assert (settings.EVENT_RETENTION_DAYS, settings.REQUEST_RETENTION_HOURS) == (30, 48)
    rules = Settings.load(env={"OPD_EVENT_RETENTION_DAYS": "7", "OPD_REQUEST_RETENTION_HOURS": "24"}).rules()
    assert (rules.event_retention_days, rules.request_retention_hours) == (7, 24)
    with pytest.raises(SettingsError, match=r"^REQUEST_RETENTION_HOURS must be at least 24 .*, not 23$"):
        Settings.load(env={"OPD_REQUEST_RETENTION_HOURS": "23"})
    with pytest.raises(SettingsError, match="EVENT_RETENTION_DAYS must be positive"):
        Settings.load(env={"OPD_EVENT_RETENTION_DAYS": "0"})
