"""The CLI a new user meets: `shardllm --help` lists every subcommand, a bad `bench` flag is one error line
(no traceback), and the server's operator limits and --api_key_file are checked before the model loads."""

from __future__ import annotations

import pytest

from shardllm.entrypoints import cli


def settings(argv: list[str]):
    return cli.resolve_settings(cli.build_parser().parse_args(argv), server=True)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert {"serve", "generate", "bench", "plan", "doctor", "deploy"} <= listed, out


@pytest.mark.parametrize("flags, message", [(["--dtype", "xyz"], "unknown dtype 'xyz'"),
                                            (["--device", "tpu"], "device must be"),
                                            (["--tp_size", "0"], "tensor_parallel_size"),
                                            (["--load_format", "pickle"], "unknown load_format"),
                                            (["--max_num_tokens", "0"], "max_num_tokens")])
def test_bad_bench_flags_print_one_error_line(capsys, flags, message):
    rc = cli.main(["bench", *flags, "--num_requests", "1", "--input_len", "4", "--output_len", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("shardllm: error: ") and message in err and "Traceback" not in err, err


def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("  s3cret\n")
    assert settings(["serve", "--api_key_file", str(key)])[1]["api_key"] == "s3cret"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        settings(["serve", "--api_key_file", str(empty)])
    with pytest.raises(ValueError, match="cannot read"):
        settings(["serve", "--api_key_file", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="not both"):
        settings(["serve", "--api_key_file", str(key), "--api_key", "x"])


def test_server_limits_flags_and_their_ranges(tmp_path):
    _, opts = settings(["serve", "--max_request_body_bytes", "1000", "--max_seqs_per_request", "4",
                        "--timeout_keep_alive", "2.5", "--request_read_timeout", "9"])
    assert {k: opts[k] for k in cli.LIMIT_KEYS} == {"max_request_body_bytes": 1000, "max_seqs_per_request": 4,
                                                     "timeout_keep_alive": 2.5, "request_read_timeout": 9.0}
    for flag, value in [("--max_request_body_bytes", "0"), ("--max_seqs_per_request", "-1"),
                        ("--timeout_keep_alive", "0"), ("--request_read_timeout", "-5")]:
        with pytest.raises(ValueError, match=flag.lstrip("-")):
            settings(["serve", flag, value])
    config = tmp_path / "c.yaml"
    config.write_text("max_seqs_per_request: 2.5\n")
    with pytest.raises(ValueError, match="an integer"):
        settings(["serve", "--config", str(config)])


def test_the_early_bind_keeps_the_port_until_the_server_listens_on_it():
    """check_bind holds its socket (the server listens on it), so nothing started while the model loads, such as
    the engine's rendezvous store on an ephemeral port, can take the port in between."""
    import socket

    sock = cli.check_bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with socket.socket() as other, pytest.raises(OSError):  # a plain bind, as an ephemeral listener's
            other.bind(("127.0.0.1", port))
    finally:
        sock.close()
    with socket.socket() as other:  # released with its socket
        other.bind(("127.0.0.1", port))
