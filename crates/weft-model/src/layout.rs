//! Where each named tensor lives in the flat parameter vector.
//!
//! Names follow GPT-2's; matrices are stored PyTorch-style `[out, in]`. The output projection is
//! tied to `wte` (as in GPT-2), so it has no tensor of its own.

use weft_core::{ModelState, StateError, Tensor};

use crate::config::{GptConfig, VOCAB};

/// Tensors of one block, in storage order.
pub const BLOCK: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.fc.weight",
    "mlp.fc.bias",
    "mlp.proj.weight",
    "mlp.proj.bias",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("model config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("model state does not fit the configured model: {0}")]
    State(#[from] StateError),
}

/// Every parameter tensor of a config, in storage order, with its place in the flat vector.
pub fn entries(config: &GptConfig) -> Vec<Entry> {
    let c = config.width;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("wte".into(), vec![VOCAB, c]), ("wpe".into(), vec![config.context, c])];
    for l in 0..config.layers {
        let block_shapes = [
            vec![c],
            vec![c],
            vec![3 * c, c],
            vec![3 * c],
            vec![c, c],
            vec![c],
            vec![c],
            vec![c],
            vec![4 * c, c],
            vec![4 * c],
            vec![c, 4 * c],
            vec![c],
        ];
        for (name, shape) in BLOCK.iter().zip(block_shapes) {
            shapes.push((format!("h.{l}.{name}"), shape));
        }
    }
    shapes.push(("ln_f.weight".into(), vec![c]));
    shapes.push(("ln_f.bias".into(), vec![c]));
    let mut offset = 0;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let len = shape.iter().product();
            let entry = Entry { name, shape, offset, len };
            offset += len;
            entry
        })
        .collect()
}

pub fn total_len(entries: &[Entry]) -> usize {
    entries.last().map_or(0, |e| e.offset + e.len)
}

pub fn to_state(entries: &[Entry], flat: &[f32]) -> ModelState {
    let mut state = ModelState::new();
    for e in entries {
        let data = flat[e.offset..e.offset + e.len].to_vec();
        // Lengths come from the same entries, so the shape always matches.
        if let Ok(tensor) = Tensor::new(e.shape.clone(), data) {
            state.insert(e.name.clone(), tensor);
        }
    }
    state
}

/// Copies a state into the flat vector after checking names, shapes and finiteness.
pub fn from_state(entries: &[Entry], state: &ModelState, flat: &mut [f32]) -> Result<(), ModelError> {
    let mut expected = ModelState::new();
    for e in entries {
        expected.insert(e.name.clone(), Tensor::zeros(e.shape.clone()));
    }
    state.check_layout(&expected)?;
    state.check_finite()?;
    for e in entries {
        let tensor = state.get(&e.name).ok_or_else(|| StateError::MissingTensor { name: e.name.clone() })?;
        flat[e.offset..e.offset + e.len].copy_from_slice(tensor.data());
    }
    Ok(())
}

/// Splits a flat parameter (or gradient) vector into the per-tensor slices of one model.
pub struct Parts<T> {
    pub wte: T,
    pub wpe: T,
    /// `blocks[l][k]` is tensor `BLOCK[k]` of block `l`.
    pub blocks: Vec<[T; 12]>,
    pub lnf_w: T,
    pub lnf_b: T,
}

pub fn split<'a>(entries: &[Entry], flat: &'a [f32]) -> Parts<&'a [f32]> {
    let mut slices: Vec<&'a [f32]> = entries.iter().map(|e| &flat[e.offset..e.offset + e.len]).collect();
    assemble(&mut slices)
}

pub fn split_mut<'a>(entries: &[Entry], mut flat: &'a mut [f32]) -> Parts<&'a mut [f32]> {
    let mut slices = Vec::with_capacity(entries.len());
    for e in entries {
        let (head, tail) = flat.split_at_mut(e.len);
        slices.push(head);
        flat = tail;
    }
    assemble(&mut slices)
}

fn assemble<T>(slices: &mut Vec<T>) -> Parts<T> {
    let lnf_b = slices.pop();
    let lnf_w = slices.pop();
    let mut iter = slices.drain(..);
    let (wte, wpe) = (iter.next(), iter.next());
    let mut blocks = Vec::new();
    loop {
        let block: Vec<T> = iter.by_ref().take(12).collect();
        match <[T; 12]>::try_from(block) {
            Ok(b) => blocks.push(b),
            Err(_) => break,
        }
    }
    // `entries` always yields wte, wpe, 12 per block and the final norm: the unwraps in this
    // function body are on our own layout, never on input.
    match (wte, wpe, lnf_w, lnf_b) {
        (Some(wte), Some(wpe), Some(lnf_w), Some(lnf_b)) => Parts { wte, wpe, blocks, lnf_w, lnf_b },
        _ => unreachable!("layout::entries always yields the embedding and final-norm tensors"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_every_parameter_once() {
        let config = GptConfig { layers: 3, heads: 2, width: 8, context: 16 };
        let e = entries(&config);
        assert_eq!(e.len(), 2 + 12 * 3 + 2);
        let c = 8;
        let per_block = 2 * c + 3 * c * c + 3 * c + c * c + c + 2 * c + 4 * c * c + 4 * c + 4 * c * c + c;
        assert_eq!(total_len(&e), VOCAB * c + 16 * c + 3 * per_block + 2 * c);
        let flat: Vec<f32> = (0..total_len(&e)).map(|i| i as f32).collect();
        let parts = split(&e, &flat);
        assert_eq!(parts.blocks.len(), 3);
        assert_eq!(parts.blocks[2][11].len(), c);
        assert_eq!(parts.lnf_b[c - 1], (total_len(&e) - 1) as f32);
        let mut back = vec![0.0; flat.len()];
        from_state(&e, &to_state(&e, &flat), &mut back).unwrap();
        assert_eq!(back, flat);
    }
}
