from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TransferRequest(_message.Message):
    __slots__ = ("from_account", "to_account", "amount", "memo")
    FROM_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MEMO_FIELD_NUMBER: _ClassVar[int]
    from_account: str
    to_account: str
    amount: int
    memo: str
    def __init__(self, from_account: _Optional[str] = ..., to_account: _Optional[str] = ..., amount: _Optional[int] = ..., memo: _Optional[str] = ...) -> None: ...

class TransferReply(_message.Message):
    __slots__ = ("transfer_id", "from_balance", "to_balance")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_BALANCE_FIELD_NUMBER: _ClassVar[int]
    TO_BALANCE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    from_balance: int
    to_balance: int
    def __init__(self, transfer_id: _Optional[str] = ..., from_balance: _Optional[int] = ..., to_balance: _Optional[int] = ...) -> None: ...

class BalanceRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class BalanceReply(_message.Message):
    __slots__ = ("account", "balance", "sequence")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    account: str
    balance: int
    sequence: int
    def __init__(self, account: _Optional[str] = ..., balance: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("account", "count")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    count: int
    def __init__(self, account: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...
