//! The real model continuing generations it did not start (`Input::Continue`): from any chunk of a first run, the
//! rest is exactly the first run's rest, greedy and seeded-sampled; a continuation whose tokens already ended the
//! generation only reports the end; hostile continuations are refused naming the field. And the drain: admission
//! stops at once, and what still runs at the deadline ends with `Interrupted`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use camelid_model::{ChatMessage, FinishReason, SamplingParams};
use camelid_worker::{Event, GenParams, Input, ModelArgs, WorkerConfig, WorkerError, WorkerHandle};

async fn start() -> WorkerHandle {
    let model = ModelArgs {
        model: None,
        dtype: None,
        device: camelid_worker::load::DeviceArg::Cpu,
        template: None,
    };
    let handle = WorkerHandle::start(WorkerConfig::default(), move || Ok(model.load()?)).unwrap();
    handle.wait_ready().await.expect("the model loads");
    handle
}

fn params(temperature: f64, max_tokens: usize) -> GenParams {
    GenParams {
        max_tokens: Some(max_tokens),
        sampling: SamplingParams {
            temperature,
            top_p: 0.95,
            seed: Some(11),
            ..SamplingParams::default()
        },
        stop: vec![],
        ignore_eos: true,
        cache_salt: String::new(),
        adapter: None,
    }
}

/// What a caller of one generation receives.
#[derive(Debug, Default)]
struct Run {
    prompt: Vec<u32>,
    chunks: Vec<(String, Vec<u32>)>,
    finished: Option<(FinishReason, usize, usize)>,
    interrupted: bool,
}

impl Run {
    fn text(&self) -> String {
        self.chunks.iter().map(|(t, _)| t.as_str()).collect()
    }
}

async fn run(handle: &WorkerHandle, input: Input, params: GenParams) -> Result<Run, WorkerError> {
    let mut generation = handle.generate(input, params).await?;
    let mut run = Run {
        prompt: generation.prompt,
        ..Run::default()
    };
    while let Some(event) = generation.events.recv().await {
        match event {
            Event::Chunk { text, token_ids } => run.chunks.push((text, token_ids)),
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => run.finished = Some((reason, prompt_tokens, completion_tokens)),
            Event::Interrupted => run.interrupted = true,
            Event::Failed(e) => return Err(e),
            Event::Started { .. } => {}
        }
    }
    Ok(run)
}

fn question() -> Input {
    Input::Chat(vec![ChatMessage::new(
        "user",
        "Write a short poem about a camel in the desert.",
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_continued_from_any_chunk_ends_as_the_first_would_have() {
    let handle = start().await;
    for temperature in [0.0, 0.9] {
        let first = run(&handle, question(), params(temperature, 24)).await.unwrap();
        let whole = first.text();
        assert_eq!(first.finished.map(|f| f.2), Some(24));
        for sent in [1, first.chunks.len() / 2, first.chunks.len()] {
            let generated: Vec<u32> = first.chunks[..sent]
                .iter()
                .flat_map(|(_, ids)| ids.clone())
                .collect();
            let input = Input::Continue {
                prompt: first.prompt.clone(),
                generated,
            };
            let rest = run(&handle, input, params(temperature, 24)).await.unwrap();
            let before: String = first.chunks[..sent].iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(
                before + &rest.text(),
                whole,
                "temperature {temperature}, continued after {sent} chunks"
            );
            assert_eq!(rest.finished, first.finished, "the usage of the whole generation");
            if sent == first.chunks.len() {
                assert!(
                    rest.chunks.is_empty(),
                    "nothing left to generate, nothing sent twice"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_continuations_are_refused_naming_the_field() {
    let handle = start().await;
    let first = run(&handle, question(), params(0.0, 4)).await.unwrap();
    let cases = [
        (vec![1, 2, u32::MAX], vec![], "continuation.prompt_token_ids"),
        (
            first.prompt.clone(),
            vec![5, 1 << 30],
            "continuation.generated_token_ids",
        ),
        // More tokens than max_tokens: a real generation never goes past its end.
        (
            first.prompt.clone(),
            vec![100; 5],
            "continuation.generated_token_ids",
        ),
    ];
    for (prompt, generated, field) in cases {
        let e = run(&handle, Input::Continue { prompt, generated }, params(0.0, 4))
            .await
            .unwrap_err();
        match e {
            WorkerError::InvalidRequest { param, .. } => assert_eq!(param, Some(field), "{e}"),
            other => panic!("{field}: {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_admits_nothing_and_interrupts_what_is_left() {
    let handle = start().await;
    let long = tokio::spawn({
        let handle = handle.clone();
        async move { run(&handle, question(), params(0.0, 2000)).await }
    });
    while handle.in_flight() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    handle.drain();
    assert!(!handle.is_ready());
    let refused = run(&handle, question(), params(0.0, 4)).await.unwrap_err();
    assert!(matches!(refused, WorkerError::Draining), "{refused}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    handle.interrupt_all().await;
    let long = long.await.unwrap().unwrap();
    assert!(long.interrupted && long.finished.is_none(), "{long:?}");
    assert!(!long.chunks.is_empty(), "it went on generating while draining");
    assert_eq!(handle.in_flight(), 0);
}
