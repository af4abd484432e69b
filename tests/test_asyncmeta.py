"""The asyncmeta vocabulary, one test per behaviour of the asyncmeta reference."""

import inspect
import re
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, Set, Tuple

import pytest

from callbackworker import asyncmeta
from callbackworker.asyncmeta import (
    STATUS_PENDING,
    Capability,
    JobMetaKey,
    Phase,
    Profile,
    RouteMetaKey,
    RouteState,
    has_all_capabilities,
    has_capability,
    supports_blob_job,
    supports_job_inspect,
    supports_route_control,
    supports_route_service,
)

try:
    from callbackworker import _native
except ImportError as exc:
    _native = None
    _NATIVE_SKIP_REASON = f"callbackworker._native cannot be imported ({exc}); build the C core"
else:
    _NATIVE_SKIP_REASON = ""

CSRC = Path(__file__).resolve().parents[1] / "csrc"

ALL_CAPABILITIES = 4095


def printed(*values: int) -> str:
    """What the reference's ``printf("%d\\n", ...)`` lines print for ``values``."""
    return "".join(f"{value:d}\n" for value in values)


# Phases and status.


def test_phase_queued_is_0() -> None:
    assert Phase.QUEUED == 0


def test_phase_running_is_1() -> None:
    assert Phase.RUNNING == 1


def test_phase_completed_is_2() -> None:
    assert Phase.COMPLETED == 2


def test_phases_follow_the_life_cycle_queued_running_completed() -> None:
    assert list(Phase) == [Phase.QUEUED, Phase.RUNNING, Phase.COMPLETED]
    assert [int(phase) for phase in Phase] == [0, 1, 2]


def test_status_pending_is_1() -> None:
    assert STATUS_PENDING == 1


# Capability bits.


def test_capability_wait_complete_is_1() -> None:
    assert Capability.WAIT_COMPLETE == 1


def test_capability_wait_drained_is_2() -> None:
    assert Capability.WAIT_DRAINED == 2


def test_capability_job_meta_is_4() -> None:
    assert Capability.JOB_META == 4


def test_capability_route_meta_is_8() -> None:
    assert Capability.ROUTE_META == 8


def test_capability_phase_text_is_16() -> None:
    assert Capability.PHASE_TEXT == 16


def test_capability_status_text_is_32() -> None:
    assert Capability.STATUS_TEXT == 32


def test_capability_job_info_is_64() -> None:
    assert Capability.JOB_INFO == 64


def test_capability_route_info_is_128() -> None:
    assert Capability.ROUTE_INFO == 128


def test_capability_route_close_is_256() -> None:
    assert Capability.ROUTE_CLOSE == 256


def test_capability_blob_take_is_512() -> None:
    assert Capability.BLOB_TAKE == 512


def test_capability_blob_result_meta_is_1024() -> None:
    assert Capability.BLOB_RESULT_META == 1024


def test_capability_known_is_2048() -> None:
    assert Capability.KNOWN == 2048


def test_capability_bits_are_twelve_distinct_powers_of_two() -> None:
    values = [int(bit) for bit in Capability.__members__.values()]
    assert len(values) == 12
    assert len(set(values)) == 12
    assert all(value > 0 and value & (value - 1) == 0 for value in values)


def test_capability_bits_together_make_4095() -> None:
    union = 0
    for bit in Capability.__members__.values():
        union |= bit
    assert union == ALL_CAPABILITIES


# Capability profiles.


def test_profile_job_inspect_is_2165() -> None:
    assert Profile.JOB_INSPECT == 2165


def test_profile_blob_job_is_3701() -> None:
    assert Profile.BLOB_JOB == 3701


def test_profile_route_control_is_2442() -> None:
    assert Profile.ROUTE_CONTROL == 2442


def test_profile_route_service_is_4095() -> None:
    assert Profile.ROUTE_SERVICE == 4095


def test_profile_job_inspect_is_wait_complete_job_meta_texts_job_info_known() -> None:
    assert Profile.JOB_INSPECT == (
        Capability.WAIT_COMPLETE
        | Capability.JOB_META
        | Capability.PHASE_TEXT
        | Capability.STATUS_TEXT
        | Capability.JOB_INFO
        | Capability.KNOWN
    )


def test_profile_blob_job_is_job_inspect_plus_blob_take_and_blob_result_meta() -> None:
    assert Profile.BLOB_JOB == (
        Profile.JOB_INSPECT | Capability.BLOB_TAKE | Capability.BLOB_RESULT_META
    )


def test_profile_route_control_is_wait_drained_route_meta_route_info_route_close_known() -> None:
    assert Profile.ROUTE_CONTROL == (
        Capability.WAIT_DRAINED
        | Capability.ROUTE_META
        | Capability.ROUTE_INFO
        | Capability.ROUTE_CLOSE
        | Capability.KNOWN
    )


def test_profile_route_service_is_blob_job_plus_route_control() -> None:
    assert Profile.ROUTE_SERVICE == Profile.BLOB_JOB | Profile.ROUTE_CONTROL


def test_profile_route_service_is_every_capability() -> None:
    assert Profile.ROUTE_SERVICE == ALL_CAPABILITIES


# Route states.


def test_route_state_closed_is_0() -> None:
    assert RouteState.CLOSED == 0


def test_route_state_open_is_1() -> None:
    assert RouteState.OPEN == 1


# JobMeta and RouteMeta field keys.


def test_job_meta_phase_is_1() -> None:
    assert JobMetaKey.PHASE == 1


def test_job_meta_status_is_2() -> None:
    assert JobMetaKey.STATUS == 2


def test_job_meta_route_is_3() -> None:
    assert JobMetaKey.ROUTE == 3


def test_job_meta_timeout_is_4() -> None:
    assert JobMetaKey.TIMEOUT == 4


def test_job_meta_known_is_5() -> None:
    assert JobMetaKey.KNOWN == 5


def test_job_meta_has_blob_result_is_6() -> None:
    assert JobMetaKey.HAS_BLOB_RESULT == 6


def test_job_meta_blob_result_size_is_7() -> None:
    assert JobMetaKey.BLOB_RESULT_SIZE == 7


def test_route_meta_state_is_1() -> None:
    assert RouteMetaKey.STATE == 1


def test_route_meta_timeout_is_2() -> None:
    assert RouteMetaKey.TIMEOUT == 2


def test_route_meta_pending_is_3() -> None:
    assert RouteMetaKey.PENDING == 3


def test_route_meta_queued_is_4() -> None:
    assert RouteMetaKey.QUEUED == 4


def test_route_meta_running_is_5() -> None:
    assert RouteMetaKey.RUNNING == 5


def test_route_meta_drained_is_6() -> None:
    assert RouteMetaKey.DRAINED == 6


def test_route_meta_known_is_7() -> None:
    assert RouteMetaKey.KNOWN == 7


def test_route_meta_close_accepted_is_8() -> None:
    assert RouteMetaKey.CLOSE_ACCEPTED == 8


def test_route_meta_closed_queued_is_9() -> None:
    assert RouteMetaKey.CLOSED_QUEUED == 9


def test_job_meta_keys_start_at_1_and_run_to_7() -> None:
    assert [int(key) for key in JobMetaKey] == list(range(1, 8))


def test_route_meta_keys_start_at_1_and_run_to_9() -> None:
    assert [int(key) for key in RouteMetaKey] == list(range(1, 10))


@pytest.mark.parametrize("key_type", [JobMetaKey, RouteMetaKey])
def test_0_is_not_a_valid_meta_key(key_type: type) -> None:
    with pytest.raises(ValueError, match="0 is not a valid"):
        key_type(0)


# Every no-argument verb of the reference, its Python twin and its example output.

REFERENCE_CONSTANTS: Dict[str, Tuple[int, str]] = {
    "PhaseQueued": (Phase.QUEUED, "0\n"),
    "PhaseRunning": (Phase.RUNNING, "1\n"),
    "PhaseCompleted": (Phase.COMPLETED, "2\n"),
    "StatusPending": (STATUS_PENDING, "1\n"),
    "CapabilityWaitComplete": (Capability.WAIT_COMPLETE, "1\n"),
    "CapabilityWaitDrained": (Capability.WAIT_DRAINED, "2\n"),
    "CapabilityJobMeta": (Capability.JOB_META, "4\n"),
    "CapabilityRouteMeta": (Capability.ROUTE_META, "8\n"),
    "CapabilityPhaseText": (Capability.PHASE_TEXT, "16\n"),
    "CapabilityStatusText": (Capability.STATUS_TEXT, "32\n"),
    "CapabilityJobInfo": (Capability.JOB_INFO, "64\n"),
    "CapabilityRouteInfo": (Capability.ROUTE_INFO, "128\n"),
    "CapabilityRouteClose": (Capability.ROUTE_CLOSE, "256\n"),
    "CapabilityBlobTake": (Capability.BLOB_TAKE, "512\n"),
    "CapabilityBlobResultMeta": (Capability.BLOB_RESULT_META, "1024\n"),
    "CapabilityKnown": (Capability.KNOWN, "2048\n"),
    "ProfileJobInspect": (Profile.JOB_INSPECT, "2165\n"),
    "ProfileBlobJob": (Profile.BLOB_JOB, "3701\n"),
    "ProfileRouteControl": (Profile.ROUTE_CONTROL, "2442\n"),
    "ProfileRouteService": (Profile.ROUTE_SERVICE, "4095\n"),
    "RouteStateClosed": (RouteState.CLOSED, "0\n"),
    "RouteStateOpen": (RouteState.OPEN, "1\n"),
    "JobMetaPhase": (JobMetaKey.PHASE, "1\n"),
    "JobMetaStatus": (JobMetaKey.STATUS, "2\n"),
    "JobMetaRoute": (JobMetaKey.ROUTE, "3\n"),
    "JobMetaTimeout": (JobMetaKey.TIMEOUT, "4\n"),
    "JobMetaKnown": (JobMetaKey.KNOWN, "5\n"),
    "JobMetaHasBlobResult": (JobMetaKey.HAS_BLOB_RESULT, "6\n"),
    "JobMetaBlobResultSize": (JobMetaKey.BLOB_RESULT_SIZE, "7\n"),
    "RouteMetaState": (RouteMetaKey.STATE, "1\n"),
    "RouteMetaTimeout": (RouteMetaKey.TIMEOUT, "2\n"),
    "RouteMetaPending": (RouteMetaKey.PENDING, "3\n"),
    "RouteMetaQueued": (RouteMetaKey.QUEUED, "4\n"),
    "RouteMetaRunning": (RouteMetaKey.RUNNING, "5\n"),
    "RouteMetaDrained": (RouteMetaKey.DRAINED, "6\n"),
    "RouteMetaKnown": (RouteMetaKey.KNOWN, "7\n"),
    "RouteMetaCloseAccepted": (RouteMetaKey.CLOSE_ACCEPTED, "8\n"),
    "RouteMetaClosedQueued": (RouteMetaKey.CLOSED_QUEUED, "9\n"),
}


def test_reference_has_38_no_argument_verbs() -> None:
    assert len(REFERENCE_CONSTANTS) == 38


@pytest.mark.parametrize("verb", sorted(REFERENCE_CONSTANTS))
def test_reference_constant_example_prints_its_value(verb: str) -> None:
    constant, output = REFERENCE_CONSTANTS[verb]
    assert printed(constant) == output


# Bitmask helpers: the reference's examples.


def test_has_all_capabilities_example_prints_1_0() -> None:
    full = has_all_capabilities(Profile.JOB_INSPECT, Profile.JOB_INSPECT)
    route_meta = has_all_capabilities(Profile.JOB_INSPECT, Capability.ROUTE_META)
    assert printed(full, route_meta) == "1\n0\n"


def test_has_capability_example_prints_1_0() -> None:
    job_meta = has_capability(Profile.JOB_INSPECT, Capability.JOB_META)
    route_meta = has_capability(Profile.JOB_INSPECT, Capability.ROUTE_META)
    assert printed(job_meta, route_meta) == "1\n0\n"


def test_supports_job_inspect_of_blob_job_is_true() -> None:
    assert printed(supports_job_inspect(Profile.BLOB_JOB)) == "1\n"


def test_supports_blob_job_of_job_inspect_is_false() -> None:
    assert printed(supports_blob_job(Profile.JOB_INSPECT)) == "0\n"


def test_supports_route_control_of_0_is_false() -> None:
    assert printed(supports_route_control(0)) == "0\n"


def test_supports_route_service_of_route_service_is_true() -> None:
    assert printed(supports_route_service(Profile.ROUTE_SERVICE)) == "1\n"


# Bitmask helpers: the documented rules.

SUPPORTS_HELPERS: Dict[Callable[[int], bool], Profile] = {
    supports_job_inspect: Profile.JOB_INSPECT,
    supports_blob_job: Profile.BLOB_JOB,
    supports_route_control: Profile.ROUTE_CONTROL,
    supports_route_service: Profile.ROUTE_SERVICE,
}

SAMPLE_MASKS = [0, 1, 5, 2165, 2442, 3701, 4094, 4095, 4096, 1 << 40, -1, -2048]


def test_has_all_capabilities_is_mask_and_required_equals_required() -> None:
    for mask in SAMPLE_MASKS:
        for required in SAMPLE_MASKS:
            assert has_all_capabilities(mask, required) == ((mask & required) == required)


def test_has_capability_is_mask_and_capability_not_0() -> None:
    for mask in SAMPLE_MASKS:
        for capability in SAMPLE_MASKS:
            assert has_capability(mask, capability) == ((mask & capability) != 0)


def test_has_capability_with_one_bit_gives_the_same_as_has_all_capabilities() -> None:
    for mask in range(ALL_CAPABILITIES + 1):
        for bit in Capability.__members__.values():
            assert has_capability(mask, bit) == has_all_capabilities(mask, bit)


@pytest.mark.parametrize("helper", list(SUPPORTS_HELPERS), ids=lambda helper: helper.__name__)
def test_supports_helper_is_has_all_capabilities_of_its_profile(
    helper: Callable[[int], bool],
) -> None:
    profile = SUPPORTS_HELPERS[helper]
    for mask in range(ALL_CAPABILITIES + 1):
        assert helper(mask) == has_all_capabilities(mask, profile)


def test_every_supports_helper_accepts_route_service() -> None:
    assert all(helper(Profile.ROUTE_SERVICE) for helper in SUPPORTS_HELPERS)


def test_no_supports_helper_accepts_0() -> None:
    assert not any(helper(0) for helper in SUPPORTS_HELPERS)


def test_helpers_compute_the_bit_test_for_negative_and_large_ints() -> None:
    assert has_all_capabilities(-1, Profile.ROUTE_SERVICE) is True
    assert has_all_capabilities(Profile.ROUTE_SERVICE, -1) is False
    assert has_capability(1 << 40 | Capability.JOB_META, Capability.JOB_META) is True
    assert has_capability(4096, ALL_CAPABILITIES) is False
    assert supports_route_service(-1) is True
    assert supports_route_service(4096) is False
    assert supports_blob_job(Profile.BLOB_JOB | 1 << 40) is True


# Bitmask helpers: argument types and result type.

HELPERS: Dict[str, Tuple[Callable[..., bool], Dict[str, int]]] = {
    "has_all_capabilities": (
        has_all_capabilities,
        {"mask": Profile.JOB_INSPECT, "required": Capability.JOB_META},
    ),
    "has_capability": (
        has_capability,
        {"mask": Profile.JOB_INSPECT, "capability": Capability.JOB_META},
    ),
    "supports_job_inspect": (supports_job_inspect, {"mask": Profile.JOB_INSPECT}),
    "supports_blob_job": (supports_blob_job, {"mask": Profile.JOB_INSPECT}),
    "supports_route_control": (supports_route_control, {"mask": Profile.JOB_INSPECT}),
    "supports_route_service": (supports_route_service, {"mask": Profile.JOB_INSPECT}),
}

HELPER_ARGUMENTS = [(name, parameter) for name in sorted(HELPERS) for parameter in HELPERS[name][1]]

NON_INTS = [True, False, 1.0, "1", b"1", None, [1]]

INT_MEMBERS = [
    Phase.COMPLETED,
    RouteState.OPEN,
    JobMetaKey.KNOWN,
    RouteMetaKey.DRAINED,
    Capability.KNOWN,
    Profile.BLOB_JOB,
]


def call_with(name: str, parameter: str, value: object) -> bool:
    """Call helper ``name`` with its sample arguments, ``parameter`` replaced by ``value``."""
    helper, arguments = HELPERS[name]
    return helper(**{**arguments, parameter: value})


def test_helper_table_names_every_parameter() -> None:
    for helper, arguments in HELPERS.values():
        assert list(inspect.signature(helper).parameters) == list(arguments)


@pytest.mark.parametrize("mask", [0, 2165, 4095, -1, 1 << 40])
@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helper_returns_bool(name: str, mask: int) -> None:
    assert type(call_with(name, "mask", mask)) is bool


@pytest.mark.parametrize("member", INT_MEMBERS, ids=repr)
@pytest.mark.parametrize(("name", "parameter"), HELPER_ARGUMENTS)
def test_helper_accepts_int_enum_and_int_flag_members(
    name: str, parameter: str, member: int
) -> None:
    assert call_with(name, parameter, member) is call_with(name, parameter, int(member))


@pytest.mark.parametrize("non_int", NON_INTS, ids=repr)
@pytest.mark.parametrize(("name", "parameter"), HELPER_ARGUMENTS)
def test_helper_raises_type_error_naming_a_non_int_argument(
    name: str, parameter: str, non_int: object
) -> None:
    with pytest.raises(TypeError) as raised:
        call_with(name, parameter, non_int)
    assert parameter in str(raised.value)
    assert type(non_int).__name__ in str(raised.value)


def test_module_exports_the_vocabulary_and_helpers() -> None:
    vocabulary = ["STATUS_PENDING", "Capability", "JobMetaKey", "Phase", "Profile"]
    vocabulary += ["RouteMetaKey", "RouteState"]
    assert sorted(asyncmeta.__all__) == sorted(vocabulary + list(HELPERS))
    assert all(hasattr(asyncmeta, name) for name in asyncmeta.__all__)


# The C core defines the same numbers once; every macro has a Python twin.

C_TWINS: Dict[str, int] = {
    "CBW_PHASE_QUEUED": Phase.QUEUED,
    "CBW_PHASE_RUNNING": Phase.RUNNING,
    "CBW_PHASE_COMPLETED": Phase.COMPLETED,
    "CBW_STATUS_OK": 0,
    "CBW_STATUS_PENDING": STATUS_PENDING,
    "CBW_STATUS_ERROR": 2,
    "CBW_STATUS_TIMEOUT": 3,
    "CBW_STATUS_SHUTDOWN": 4,
    "CBW_STATUS_CANCELLED": 5,
    "CBW_STATE_QUEUED": 0,
    "CBW_STATE_RUNNING": 1,
    "CBW_STATE_SUCCEEDED": 2,
    "CBW_STATE_FAILED": 3,
    "CBW_STATE_TIMED_OUT": 4,
    "CBW_STATE_CANCELLED": 5,
    "CBW_STATE_SHUT_DOWN": 6,
    "CBW_STATE_SUSPENDED": 7,
    "CBW_CAP_WAIT_COMPLETE": Capability.WAIT_COMPLETE,
    "CBW_CAP_WAIT_DRAINED": Capability.WAIT_DRAINED,
    "CBW_CAP_JOB_META": Capability.JOB_META,
    "CBW_CAP_ROUTE_META": Capability.ROUTE_META,
    "CBW_CAP_PHASE_TEXT": Capability.PHASE_TEXT,
    "CBW_CAP_STATUS_TEXT": Capability.STATUS_TEXT,
    "CBW_CAP_JOB_INFO": Capability.JOB_INFO,
    "CBW_CAP_ROUTE_INFO": Capability.ROUTE_INFO,
    "CBW_CAP_ROUTE_CLOSE": Capability.ROUTE_CLOSE,
    "CBW_CAP_BLOB_TAKE": Capability.BLOB_TAKE,
    "CBW_CAP_BLOB_RESULT_META": Capability.BLOB_RESULT_META,
    "CBW_CAP_KNOWN": Capability.KNOWN,
    "CBW_PROFILE_JOB_INSPECT": Profile.JOB_INSPECT,
    "CBW_PROFILE_BLOB_JOB": Profile.BLOB_JOB,
    "CBW_PROFILE_ROUTE_CONTROL": Profile.ROUTE_CONTROL,
    "CBW_PROFILE_ROUTE_SERVICE": Profile.ROUTE_SERVICE,
    "CBW_ROUTE_CLOSED": RouteState.CLOSED,
    "CBW_ROUTE_OPEN": RouteState.OPEN,
    "CBW_JOB_META_PHASE": JobMetaKey.PHASE,
    "CBW_JOB_META_STATUS": JobMetaKey.STATUS,
    "CBW_JOB_META_ROUTE": JobMetaKey.ROUTE,
    "CBW_JOB_META_TIMEOUT": JobMetaKey.TIMEOUT,
    "CBW_JOB_META_KNOWN": JobMetaKey.KNOWN,
    "CBW_JOB_META_HAS_BLOB_RESULT": JobMetaKey.HAS_BLOB_RESULT,
    "CBW_JOB_META_BLOB_RESULT_SIZE": JobMetaKey.BLOB_RESULT_SIZE,
    "CBW_ROUTE_META_STATE": RouteMetaKey.STATE,
    "CBW_ROUTE_META_TIMEOUT": RouteMetaKey.TIMEOUT,
    "CBW_ROUTE_META_PENDING": RouteMetaKey.PENDING,
    "CBW_ROUTE_META_QUEUED": RouteMetaKey.QUEUED,
    "CBW_ROUTE_META_RUNNING": RouteMetaKey.RUNNING,
    "CBW_ROUTE_META_DRAINED": RouteMetaKey.DRAINED,
    "CBW_ROUTE_META_KNOWN": RouteMetaKey.KNOWN,
    "CBW_ROUTE_META_CLOSE_ACCEPTED": RouteMetaKey.CLOSE_ACCEPTED,
    "CBW_ROUTE_META_CLOSED_QUEUED": RouteMetaKey.CLOSED_QUEUED,
}


def c_macro_names() -> Set[str]:
    """The ``CBW_*`` constants defined in ``cbw_asyncmeta.h``.

    A macro counts only if it has a value, which leaves out the include guard.
    """
    header = (CSRC / "cbw_asyncmeta.h").read_text()
    return set(re.findall(r"^#define[ \t]+(CBW_\w+)[ \t]+\S", header, re.MULTILINE))


def test_every_c_macro_has_a_python_twin() -> None:
    assert c_macro_names() == set(C_TWINS)


def test_every_python_constant_has_a_c_twin() -> None:
    vocabulary = [Phase, Capability, Profile, RouteState, JobMetaKey, RouteMetaKey]
    python_members = {
        (type(member), member.name) for enum in vocabulary for member in enum.__members__.values()
    }
    c_twinned = {(type(value), value.name) for value in C_TWINS.values() if isinstance(value, Enum)}
    assert python_members == c_twinned


@pytest.mark.skipif(_native is None, reason=_NATIVE_SKIP_REASON)
def test_c_and_python_agree() -> None:
    c_values = {name: getattr(_native.lib, name, None) for name in C_TWINS}
    assert c_values == {name: int(value) for name, value in C_TWINS.items()}
