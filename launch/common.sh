# Shell helpers the launch scripts share (sourced, not run).

show() {  # show ARGS...: print them as one shell-quoted line (plain words stay as they are)
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a")
    elif [[ $a != *"'"* ]]; then out+=("'$a'")
    else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
