//! A cache in shared blocks computes what a cache with its own buffers does: prefill, chunked prefill and decode,
//! on the libtorch path and the CPU decode step, with block tables out of order and a prefix whose blocks another
//! sequence filled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use camelid_model::config::Config;
use camelid_model::cpu_gemv::with_decode_pool;
use camelid_model::{BlockStore, KvCache, Llama, SharedBlocks};
use tch::{Device, Kind, Tensor};

const BLOCK: usize = 4;

fn model() -> Llama {
    let config = Config::from_hf_str(
        r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5}"#,
    )
    .unwrap();
    Llama::random(config, Kind::Float, Device::Cpu, 5).unwrap()
}

fn store(model: &Llama, blocks: usize) -> SharedBlocks {
    let c = model.config();
    let store = BlockStore::new(
        c.num_layers,
        blocks,
        BLOCK,
        [c.num_kv_heads, c.head_dim],
        (Kind::Float, Device::Cpu),
    )
    .unwrap();
    Arc::new(Mutex::new(store))
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 31 + 7) % 97) as u32).collect()
}

fn diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn a_paged_cache_equals_an_own_cache_through_prefill_chunks_and_decode() {
    let _g = tch::no_grad_guard();
    let model = model();
    let ids = tokens(14);
    let shared = store(&model, 8);
    // Blocks out of order, as a long-running worker hands them out.
    let mut paged = KvCache::paged(shared, vec![6, 2, 7, 0], 0);
    let mut own = model.new_cache();
    for chunk in [&ids[..5], &ids[5..9]] {
        let a = model.forward_last(chunk, &mut paged).unwrap();
        let b = model.forward_last(chunk, &mut own).unwrap();
        assert!(diff(&a, &b) < 1e-5, "prefill chunk differs");
    }
    with_decode_pool(|pool| {
        for &t in &ids[9..] {
            let a = model.forward_last_in(&[t], &mut paged, Some(pool)).unwrap();
            let b = model.forward_last_in(&[t], &mut own, Some(pool)).unwrap();
            assert!(a.equal(&b), "decode step differs");
        }
    });
    assert_eq!(paged.len(), 14);
}

#[test]
fn a_prefix_filled_by_one_sequence_serves_another() {
    let _g = tch::no_grad_guard();
    let model = model();
    let shared = store(&model, 8);
    let prompt = tokens(11);
    // The first sequence fills blocks 3 and 5 with the first 8 positions (two full blocks) and goes on.
    let mut first = KvCache::paged(shared.clone(), vec![3, 5, 1], 0);
    let _ = model.forward_last(&prompt, &mut first).unwrap();
    // The second starts from those two blocks and computes only the rest of its prompt.
    let mut second = KvCache::paged(shared, vec![3, 5, 4], 2 * BLOCK);
    let from_prefix = model.forward_last(&prompt[2 * BLOCK..], &mut second).unwrap();
    let whole = model.forward_last(&prompt, &mut model.new_cache()).unwrap();
    assert!(diff(&from_prefix, &whole) < 1e-5);
    // Decoding on, batched, the two sequences get what each would alone.
    with_decode_pool(|pool| {
        let mut caches = [&mut first, &mut second];
        let batched = model.decode_step(&[9, 9], &mut caches, Some(pool)).unwrap();
        let mut alone = model.new_cache();
        let _ = model.forward_last(&prompt, &mut alone).unwrap();
        let expected = model.forward_last_in(&[9], &mut alone, Some(pool)).unwrap();
        // The first sequence's keys are those of the same prefill: the same bits. The second computed its last
        // positions as a chunk after the prefix: the same values within summation order.
        assert!(batched.get(0).equal(&expected), "the first sequence differs");
        assert!(
            diff(&batched.get(1), &expected) < 1e-5,
            "the second sequence differs"
        );
    });
}

#[test]
fn a_position_past_the_block_table_is_an_error_not_a_write_elsewhere() {
    let _g = tch::no_grad_guard();
    let model = model();
    let mut cache = KvCache::paged(store(&model, 2), vec![1], 0);
    let err = model.forward_last(&tokens(BLOCK + 1), &mut cache).unwrap_err();
    assert!(err.to_string().contains("no block for position"), "{err}");
    let mut cache = KvCache::paged(store(&model, 2), vec![7], 0);
    let err = model.forward_last(&tokens(2), &mut cache).unwrap_err();
    assert!(err.to_string().contains("no block for position"), "{err}");
}
