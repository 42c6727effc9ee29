"""Runs end by themselves: DataLoader workers that ignore stop signals never keep a finished
process alive, and stop signals get their previous handlers back once the work is done.

The end-to-end tests train with real loader workers (the other train_net.py tests use none), and
a hang fails them through the subprocess time limit instead of stalling the suite.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, TINY_LAZY_OPTS, TINY_YAML_OPTS, run_python

# A process that ends with a spared loader's iterator still alive, its workers idle: kept by a
# global (freed only after atexit ran), or by the traceback of an uncaught exception.
ALIVE_AT_EXIT = textwrap.dedent("""
    import sys
    from torch.utils.data import DataLoader
    from masklab_d2.utils.stop_signals import spare_loader_workers

    loader = spare_loader_workers(DataLoader(list(range(64)), batch_size=2, num_workers=2))
    batches = iter(loader)
    next(batches)
    print("iterated", flush=True)
    if sys.argv[1] == "error":
        raise RuntimeError("a failure with the loader alive")
    """)


@pytest.mark.parametrize("ending", ["finished", "error"])
def test_spared_loader_workers_do_not_keep_a_finished_process_alive(ending):
    # multiprocessing ends daemonic children at exit with SIGTERM, which the spared workers
    # ignore, and then joins them: before the fix this waited forever.
    try:
        result = subprocess.run(
            [sys.executable, "-c", ALIVE_AT_EXIT, ending],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: its loader workers kept it alive")
    assert "iterated" in result.stdout
    assert result.returncode == (0 if ending == "finished" else 1), result.stderr


def test_workers_still_ignore_stop_signals_sent_to_the_whole_group(tmp_path):
    # The exit's kill must not undo what spare_loader_workers is for: a SIGTERM to every
    # process of the run (scancel) leaves the workers alive for the main process to stop.
    script = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        from torch.utils.data import DataLoader
        from masklab_d2.utils.stop_signals import install_signal_handlers, spare_loader_workers
        from masklab_d2.utils.stop_signals import stop_requested

        install_signal_handlers()
        loader = spare_loader_workers(DataLoader(list(range(64)), batch_size=2, num_workers=2))
        batches = iter(loader)
        next(batches)
        # From another process, as scancel's: the workers exit on their parent's SIGTERM.
        killer = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
        subprocess.run([sys.executable, "-c", killer])  # in the group: it dies of it too
        time.sleep(0.5)
        assert stop_requested() == signal.SIGTERM
        print("next batch", next(batches).tolist(), flush=True)
        """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        start_new_session=True,  # the group signal reaches only this run
    )
    assert result.returncode == 0, result.stderr
    assert "next batch [2, 3]" in result.stdout


def test_a_forked_child_ends_on_sigterm_whichever_thread_receives_it():
    # A pool worker blocked on its queue while another of its threads takes the pool's SIGTERM:
    # with the recording handler inherited, only the main thread could act on it, and the pool's
    # terminate() waited for ever (seen as a hang while the shapes data was generated).
    script = textwrap.dedent("""
        import os, signal, threading, time
        from masklab_d2.utils.stop_signals import install_signal_handlers

        install_signal_handlers()
        pid = os.fork()
        if pid == 0:
            threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # only the thread gets it
            threading.Event().wait()
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child ended by signal", os.WTERMSIG(status), flush=True)
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            print("child still alive", flush=True)
        """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert f"child ended by signal {int(signal.SIGTERM)}" in result.stdout, result.stderr


@pytest.mark.detectron2
@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_launch_gives_stop_signals_back_when_done(fails):
    from masklab_d2.engine import launch

    calls = []

    def main():
        calls.append("main")
        if fails:
            raise RuntimeError("training failed")

    before = signal.getsignal(signal.SIGTERM)
    if fails:
        with pytest.raises(RuntimeError):
            launch(main, 1)
    else:
        launch(main, 1)
    assert calls == ["main"]
    # A stop signal that arrives during the exit must end the process, not only be recorded.
    assert signal.getsignal(signal.SIGTERM) is before


def _yaml_run(output_dir, *extra):
    config = os.path.join(REPO, "configs", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml")
    workers = "SOLVER.MAX_ITER 2 TEST.PRECISE_BN.ENABLED False DATALOADER.NUM_WORKERS 2".split()
    return [
        "--config-file",
        config,
        *extra,
        *TINY_YAML_OPTS,
        *workers,
        "OUTPUT_DIR",
        str(output_dir),
    ]


def _lazy_run(output_dir, *extra):
    config = os.path.join(REPO, "configs", "lazy", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.py")
    workers = [
        "dataloader.train.num_workers=2",
        "dataloader.test.num_workers=2",
        "train.max_iter=2",
        "train.precise_bn.enabled=False",
        f"train.output_dir={output_dir}",
    ]
    return ["--config-file", config, *extra, *TINY_LAZY_OPTS, *workers]


@pytest.mark.detectron2
@pytest.mark.slow
@pytest.mark.parametrize("command", [_yaml_run, _lazy_run], ids=["yaml", "lazy"])
def test_train_net_exits_by_itself_with_loader_workers(command, tmp_path):
    # The lazy run kept its trainer (and the training loader's workers) alive in a reference
    # cycle, and then waited for them at exit forever.
    output = tmp_path / "run"
    train_net = os.path.join(REPO, "train_net.py")
    for args in (command(output), command(output, "--eval-only", "--resume")):
        try:
            result = run_python(train_net, *args, timeout=480)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train_net.py {' '.join(args[2:3])} did not exit by itself")
        assert result.returncode == 0, result.stdout[-3000:]
        assert "segm" in result.stdout  # it evaluated
    assert (output / "model_final.pth").exists()
