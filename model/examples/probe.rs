use std::time::Instant;
fn main() {
    let path = camelid_model::default_model_path().unwrap();
    let kind = if std::env::args().any(|a| a == "bf16") { tch::Kind::BFloat16 } else { tch::Kind::Float };
    let m = camelid_model::load(&path, camelid_model::LoadOptions { dtype: kind, device: tch::Device::Cpu }).unwrap();
    let prompt = m.chat_prompt(&[camelid_model::ChatMessage::new("user", "Write a long essay about llamas.")]).unwrap();
    for round in 0..3 {
        {
            let _g = tch::no_grad_guard();
            tch::set_num_threads(1);
            let mut cache = m.model.new_cache();
            let _ = m.model.forward_last(&prompt, &mut cache).unwrap();
            let t = Instant::now();
            for i in 0..128 {
                let _ = m.model.forward_last(&[(i * 7 + 100) as u32], &mut cache).unwrap();
            }
            println!("round {round} raw loop: {:.1} tok/s", 128.0 / t.elapsed().as_secs_f64());
            tch::set_num_threads(2);
        }
        let req = camelid_model::GenerateRequest { prompt_ids: prompt.clone(), max_tokens: 129, sampling: camelid_model::SamplingParams::greedy(), stop: vec![], eos_token_ids: vec![] };
        let done = camelid_model::generate(&m.model, &m.tokenizer, &req, |_| true).unwrap();
        println!("round {round} generate: {:.1} tok/s", done.decode_tokens_per_second());
    }
}
