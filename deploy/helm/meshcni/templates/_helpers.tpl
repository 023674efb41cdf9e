{{/* Common labels. */}}
{{- define "meshcni.labels" -}}
app.kubernetes.io/name: meshcni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meshcni
{{- end }}

{{/* Ambient config dir on the host. */}}
{{- define "meshcni.ambientConfigDir" -}}
{{- default "/etc/ambient-config" .Values.ambient.configDir -}}
{{- end }}
