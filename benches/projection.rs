//! Criterion benches of the pure-Rust projections (`cargo bench --bench projection`).
//!
//! - `factor`: building the basis of a `n x m` matrix by thin SVD vs pivoted QR (the choice
//!   documented in docs/linalg.md);
//! - `encoder_apply`: `Y = X - (X U) U^T` on a batch, f32 and f64;
//! - `jacobian`: factor + apply in one call, as a recovery step does, by the Gram route and by
//!   the SVD route (docs/linalg.md).
//!
//! Sizes are GPT-2 small / Gemma-2-2B residual widths (768, 2304). Threads: rayon's global pool
//! (`RAYON_NUM_THREADS`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use faer::Mat;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use saerecover_core::{
    default_par, jacobian_null_project_with, EncoderNullProjector, Factorization, JacobianRoute,
    SpanBasis,
};
use std::hint::black_box;
use std::time::Duration;

fn uniform(rng: &mut StdRng, nrows: usize, ncols: usize) -> Mat<f64> {
    Mat::from_fn(nrows, ncols, |_, _| rng.random::<f64>() - 0.5)
}

fn factor(c: &mut Criterion) {
    let par = default_par();
    let mut rng = StdRng::seed_from_u64(0);
    let mut group = c.benchmark_group("factor");
    for &(n, m) in &[(768, 64), (2304, 64), (2304, 256), (2304, 1024)] {
        let a = uniform(&mut rng, n, m);
        for (name, method) in [
            ("svd", Factorization::Svd),
            ("col_piv_qr", Factorization::ColPivQr),
        ] {
            group.bench_with_input(BenchmarkId::new(name, format!("{n}x{m}")), &a, |b, a| {
                b.iter(|| SpanBasis::from_columns("A", black_box(a.as_ref()), None, method, par))
            });
        }
    }
    group.finish();
}

fn encoder_apply(c: &mut Criterion) {
    let par = default_par();
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group("encoder_apply");
    let (d, rows) = (2304, 4096);
    for &k in &[64, 512] {
        let a = uniform(&mut rng, d, k);
        let p = EncoderNullProjector::from_matrix(a.as_ref(), None, par).unwrap();
        let x64 = uniform(&mut rng, rows, d);
        let x32 = Mat::<f32>::from_fn(rows, d, |i, j| x64[(i, j)] as f32);
        group.throughput(Throughput::Elements((rows * d) as u64));
        let mut y64 = Mat::<f64>::zeros(rows, d);
        group.bench_function(BenchmarkId::new("f64", format!("{rows}x{d}_k{k}")), |b| {
            b.iter(|| p.apply(y64.as_mut(), black_box(x64.as_ref()), par).unwrap())
        });
        let mut y32 = Mat::<f32>::zeros(rows, d);
        group.bench_function(BenchmarkId::new("f32", format!("{rows}x{d}_k{k}")), |b| {
            b.iter(|| p.apply(y32.as_mut(), black_box(x32.as_ref()), par).unwrap())
        });
    }
    group.finish();
}

fn jacobian(c: &mut Criterion) {
    let par = default_par();
    let mut rng = StdRng::seed_from_u64(2);
    let mut group = c.benchmark_group("jacobian");
    let (n, batch) = (2304, 64);
    for &m in &[16, 128, 512] {
        let j = uniform(&mut rng, m, n);
        let g = Mat::<f32>::from_fn(batch, n, |_, _| rng.random::<f32>() - 0.5);
        let mut y = Mat::<f32>::zeros(batch, n);
        for (name, route) in [("gram", JacobianRoute::Gram), ("svd", JacobianRoute::Svd)] {
            let id = BenchmarkId::new(format!("f32_{name}"), format!("J{m}x{n}_G{batch}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    let j = black_box(j.as_ref());
                    jacobian_null_project_with(y.as_mut(), j, g.as_ref(), None, route, par)
                })
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = factor, encoder_apply, jacobian }
criterion_main!(benches);
