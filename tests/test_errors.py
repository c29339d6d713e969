"""The project's user-error type: message and fix, the built-in kinds, pickling, the printed form."""

from __future__ import annotations

import pickle

import pytest

from neurojepa_pl.errors import UserError, UserFileNotFoundError, UserKeyError, UserValueError, format_user_error


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [(UserError, Exception), (UserValueError, ValueError), (UserFileNotFoundError, OSError), (UserKeyError, KeyError)],
)
def test_message_fix_and_kind(cls, builtin):
    err = cls("manifest x.csv does not exist", "pass the CSV")
    assert isinstance(err, builtin) and isinstance(err, UserError)
    assert (err.message, err.fix) == ("manifest x.csv does not exist", "pass the CSV")
    assert str(err) == "manifest x.csv does not exist\nfix: pass the CSV"  # KeyError's quoting is not applied
    copy = pickle.loads(pickle.dumps(err))  # DataLoader workers send errors to the main process pickled
    assert type(copy) is cls and (copy.message, copy.fix) == (err.message, err.fix)
    assert str(cls("no fix given")) == "no fix given"


def test_printed_form_keeps_multiline_messages():
    err = UserValueError("3 scans cannot be used:\npath | reason | fix\n/a | missing_file | correct it", "fix them")
    assert format_user_error(err) == (
        "neurojepa: error: 3 scans cannot be used:\npath | reason | fix\n/a | missing_file | correct it\nfix: fix them"
    )
    assert format_user_error(UserError("bad"), prog="neurojepa fit") == "neurojepa fit: error: bad"
