"""The checkpoint cadence's decision rule (kislurm.train.checkpoint.SaveCadence), on a clock the test moves: when a
cell saves, for each cadence a config can ask for, without a model or a wait."""

from kislurm.train.checkpoint import SaveCadence


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_by_default_a_checkpoint_follows_every_evaluation_but_the_first_and_the_last():
    cadence = SaveCadence(clock=Clock())
    assert cadence.scheduled(20) == [] and not cadence.clock_due()
    assert [s for s in (0, 5, 10, 15, 20) if cadence.should_save(s, evaluated=True, last=s == 20)] == [5, 10, 15]
    assert not cadence.should_save(7)  # a step with no evaluation


def test_a_step_cadence_saves_at_its_multiples_evaluated_or_not_and_no_longer_after_evaluations():
    cadence = SaveCadence(every_steps=4)
    assert cadence.scheduled(12) == [4, 8]  # the last step is Trainer.finish's
    assert [s for s in range(13) if cadence.should_save(s, evaluated=s % 6 == 0, last=s == 12)] == [4, 8]


def test_a_minutes_cadence_is_due_on_its_clock_restarts_at_each_save_and_wins_over_the_last_step():
    clock = Clock()
    cadence = SaveCadence(every_minutes=2.0, clock=clock)
    clock.now += 119.0
    assert not cadence.clock_due()
    assert not cadence.should_save(5, evaluated=True)  # a configured cadence replaces the saves after evaluations
    clock.now += 1.0
    assert cadence.clock_due()
    assert cadence.should_save(20, last=True, timed=cadence.clock_due())
    cadence.saved()
    assert not cadence.clock_due()
    clock.now += 120.0
    assert cadence.clock_due()


def test_the_stop_signal_always_saves():
    for cadence in (SaveCadence(), SaveCadence(every_steps=100), SaveCadence(every_minutes=60.0, clock=Clock())):
        assert cadence.should_save(3, stopping=True) and cadence.should_save(20, stopping=True, last=True)
