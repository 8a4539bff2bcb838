"""Progressive distillation against closed forms: with Gaussian data N(μ, s² I) the exact teacher's x̂_0 is affine in
z, so are its DDIM steps and the student's target; a round of training converges to that exact map, and the student's
N-step DDIM sampling (the library's sampler, trailing spacing) equals the teacher's 2N steps."""

import numpy as np
import torch

from diffusion.distill import ddim_step, distillation_grid, distillation_loss, teacher_targets
from diffusion.samplers import sample
from diffusion.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear(200, 1e-4 * 5, 0.02 * 5)
MU, S, DIM = 0.3, 0.5, 4


def exact_x0(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x_0 | z_t] for x_0 ~ N(μ, s² I): μ + √ᾱ s² / (ᾱ s² + 1 − ᾱ) · (z − √ᾱ μ)."""
    abar = SCHED.table("alphas_cumprod", "cpu", z.dtype)[t].reshape(-1, 1)
    return MU + abar.sqrt() * S**2 / (abar * S**2 + 1 - abar) * (z - abar.sqrt() * MU)


def exact_step(z: np.ndarray, t_from: int, t_to: int) -> np.ndarray:
    """One DDIM step of the exact teacher in numpy float64 (t_to = −1: the clean image)."""
    a = SCHED.alphas_cumprod[t_from]
    b = 1.0 if t_to < 0 else SCHED.alphas_cumprod[t_to]
    x0 = MU + np.sqrt(a) * S**2 / (a * S**2 + 1 - a) * (z - np.sqrt(a) * MU)
    return np.sqrt(b) * x0 + np.sqrt(1 - b) * (z - np.sqrt(a) * x0) / np.sqrt(1 - a)


def test_the_grid_is_the_trailing_grid_and_its_midpoints():
    student, middle = distillation_grid(200, 4)
    assert student.tolist() == [49, 99, 149, 199] and middle.tolist() == [24, 74, 124, 174]


def test_one_step_with_the_target_lands_where_two_exact_teacher_steps_land():
    student, middle = distillation_grid(200, 4)
    z = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    target = teacher_targets(exact_x0, SCHED, 4, z, k)
    for row in range(8):
        t, m = student[k[row]], middle[k[row]]
        after = student[k[row] - 1] if k[row] > 0 else -1
        two_steps = exact_step(exact_step(z[row].numpy(), t, m), m, after)
        abar_t = torch.tensor(SCHED.alphas_cumprod[t], dtype=torch.float64)
        abar_next = torch.tensor(1.0 if after < 0 else SCHED.alphas_cumprod[after], dtype=torch.float64)
        one_step = ddim_step(z[row], target[row], abar_t, abar_next)
        np.testing.assert_allclose(one_step.numpy(), two_steps, rtol=1e-10, atol=1e-10)


class AffineStudent(torch.nn.Module):
    """x̂_0 = A_k ⊙ z + c_k at each of the student's N grid positions (the exact student is of this form)."""

    def __init__(self, steps: int):
        super().__init__()
        self.scale, self.shift = torch.nn.Parameter(torch.ones(steps, DIM)), torch.nn.Parameter(torch.zeros(steps, DIM))

    def forward(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.scale[k] * z + self.shift[k]


def train_affine_student(steps: int, iterations: int = 600) -> AffineStudent:
    student_idx = torch.as_tensor(distillation_grid(SCHED.num_timesteps, steps)[0])
    student = AffineStudent(steps)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(iterations):
        k = torch.randint(0, steps, (256,), generator=generator)
        t = student_idx[k]
        x0 = MU + S * torch.randn(256, DIM, generator=generator)
        abar = SCHED.table("alphas_cumprod", "cpu", torch.float32)[t].reshape(-1, 1)
        z = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(256, DIM, generator=generator)
        loss = distillation_loss(student(z, k), teacher_targets(exact_x0, SCHED, steps, z, k), SCHED, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student


def test_a_round_converges_to_the_exact_target_map_and_samples_like_the_teacher_in_half_the_steps():
    steps = 4
    student = train_affine_student(steps)
    z = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(-1, 1).expand(7, DIM)
    for k in range(steps):
        ks = torch.full((7,), k)
        want = teacher_targets(exact_x0, SCHED, steps, z, ks)
        np.testing.assert_allclose(student(z.float(), ks).detach().numpy(), want.numpy(), atol=2e-3)
    student_idx = torch.as_tensor(distillation_grid(SCHED.num_timesteps, steps)[0])
    position = {int(t): k for k, t in enumerate(student_idx)}

    def as_eps(x0_of):  # the samplers call model(x, original timesteps) → ε̂
        def model(x, t):
            abar = SCHED.table("alphas_cumprod", "cpu", x.dtype)[t].reshape(-1, 1)
            return (x - abar.sqrt() * x0_of(x, t)) / (1 - abar).sqrt()
        return model

    student_eps = as_eps(lambda x, t: student(x, torch.tensor([position[int(i)] for i in t])).detach().to(x.dtype))
    x_T = torch.randn(64, DIM, generator=torch.Generator().manual_seed(2))
    one = sample(student_eps, SCHED, x_T.shape, "ddim", steps, x_T=x_T, spacing="trailing")
    two = sample(as_eps(exact_x0), SCHED, x_T.shape, "ddim", 2 * steps, x_T=x_T, spacing="trailing")
    np.testing.assert_allclose(one.numpy(), two.numpy(), atol=5e-3)
